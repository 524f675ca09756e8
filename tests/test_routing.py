"""Rollout routing replay (r1/routing.py): the engine's expert choices, recorded token by token, reused by the
training forward."""

import copy

import pytest
import torch

from r1.model import PRESETS, V3ForCausalLM
from r1.routing import UNROUTED, RoutingRecorder, RoutingReplay, from_vllm, moe_routers
from r1.trainer import sequence_logprobs
from rollouts import SamplingParams
from rollouts.torch_engine import TorchEngine

P, C = 6, 10  # prompt and completion lengths of the fixed batch


def model(seed: int = 0) -> V3ForCausalLM:
    torch.manual_seed(seed)
    m = V3ForCausalLM(PRESETS["tiny"].replace(num_nextn_predict_layers=0))
    for r in moe_routers(m):  # spread scores: most choices well clear of ties
        torch.nn.init.normal_(r.weight, std=0.5)
    return m.train()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (4, P + C), generator=g)
    return ids, torch.ones_like(ids)


def routed(m: V3ForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The experts a plain forward chooses, [B, T, L, K]."""
    with torch.no_grad(), RoutingRecorder(m) as rec:
        m(ids, attention_mask=mask, mtp=False)
        return rec.take().view(*ids.shape, len(rec.routers), rec.top_k)


def logprobs_and_grads(m: V3ForCausalLM, ids, mask, experts=None):
    m.zero_grad(set_to_none=True)
    with RoutingReplay(m, experts) if experts is not None else torch.enable_grad() as rp:
        lp = sequence_logprobs(m, ids, mask, P, 1.0)[0]
        lp.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return lp.detach(), grads, rp


def test_replaying_the_models_own_routing_changes_nothing():
    m, (ids, mask) = model(), batch()
    lp0, g0, _ = logprobs_and_grads(m, ids, mask)
    lp1, g1, rp = logprobs_and_grads(m, ids, mask, routed(m, ids, mask))
    assert torch.equal(lp0, lp1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert rp.agreement() == 1.0


def test_replay_follows_a_perturbed_engine_and_the_router_still_learns():
    """The 'engine' routes with another balancing bias (the weights are the same): its log-probs differ from the
    trainer's through routing alone. Replaying its choices brings the trainer to it; the gap shrinks >= 5x."""
    trainer, (ids, mask) = model(), batch()
    engine = copy.deepcopy(trainer)
    torch.manual_seed(3)
    for r in moe_routers(engine):
        r.e_score_correction_bias.normal_(std=0.3)
    with torch.no_grad():
        engine_lp = sequence_logprobs(engine, ids, mask, P, 1.0)[0]
    recorded = routed(engine, ids, mask)
    plain, _, _ = logprobs_and_grads(trainer, ids, mask)
    replayed, grads, rp = logprobs_and_grads(trainer, ids, mask, recorded)
    gap_plain = (plain - engine_lp).abs().mean().item()
    gap_replay = (replayed - engine_lp).abs().mean().item()
    print(f"agreement {rp.agreement():.3f}, gap without replay {gap_plain:.2e}, with {gap_replay:.2e}")
    assert rp.agreement() < 0.9
    assert gap_plain > 1e-3 and gap_replay * 5 < gap_plain
    assert gap_replay < 1e-5
    routers = [n for n in grads if n.endswith("mlp.gate.weight")]
    assert routers and all(grads[n].abs().sum() > 0 for n in routers)  # gate weights: the router's own scores


def test_replayed_loads_feed_the_balancing_counts():
    trainer, (ids, mask) = model(), batch()
    recorded = torch.zeros(*ids.shape, len(moe_routers(trainer)), 2, dtype=torch.int16)
    recorded[..., 1] = 5  # every token to experts 0 and 5
    for blk in trainer.layers:
        if hasattr(blk.mlp, "tokens_per_expert"):
            blk.mlp.tokens_per_expert.zero_()
    logprobs_and_grads(trainer, ids, mask, recorded)
    counts = [blk.mlp.tokens_per_expert for blk in trainer.layers if hasattr(blk.mlp, "tokens_per_expert")]
    assert all(c[0] == c[5] == ids.numel() and c.sum() == 2 * ids.numel() for c in counts)


def test_unrouted_tokens_keep_the_routers_choice_and_bad_shapes_fail():
    m, (ids, mask) = model(), batch()
    own = routed(m, ids, mask)
    rec = own.clone()
    rec[:, -1] = UNROUTED  # as an engine leaves the last token
    lp0, _, _ = logprobs_and_grads(m, ids, mask)
    lp1, _, _ = logprobs_and_grads(m, ids, mask, rec)
    assert torch.equal(lp0, lp1)
    with pytest.raises(ValueError, match="routing replay"):
        logprobs_and_grads(m, ids, mask, own[:, :-1])


def test_engine_records_every_prompt_and_completion_token():
    """n samples per prompt, prompts of different lengths (left padding), samples that stop early: each Rollout's
    routed experts line up token for token with a plain forward over its prompt + completion (the same model),
    and only the last token is UNROUTED."""
    m = model().eval()
    eng = TorchEngine(m, eos_token_id=7, pad_token_id=0, return_routed_experts=True)
    prompts = [[5, 9, 11, 4], [20, 21, 22, 23, 24, 25, 26], [30, 31]]
    outs = eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, seed=0), n=3)
    L, K = len(moe_routers(m)), PRESETS["tiny"].num_experts_per_tok
    agree = total = 0
    for o in outs:
        seq = prompts[o.prompt_index] + o.token_ids
        assert o.routed_experts.shape == (len(seq), L, K) and o.routed_experts.dtype == torch.int16
        assert (o.routed_experts[-1] == UNROUTED).all() and (o.routed_experts[:-1] >= 0).all()
        ids = torch.tensor([seq])
        want = routed(m, ids, torch.ones_like(ids))[0, :-1]
        got = o.routed_experts[:-1]
        agree += (got.sort(-1).values == want.sort(-1).values).all(-1).sum().item()
        total += got.shape[0] * L
    assert agree / total > 0.98  # cached decode and a full forward round apart; a shift by one token: ~0.1


def test_vllm_routed_experts_become_r1s_layout():
    """vLLM's array ([tokens - 1, num_hidden_layers, top_k] uint8, the dense layer's column unwritten) as vLLM's
    capturer fills it, from this model's routing: the MoE columns come back token for token, the last UNROUTED."""
    import numpy as np

    m, (ids, mask) = model(), batch()
    own = routed(m, ids, mask)[0]  # [T, L, K], L = the 2 MoE layers of 3 (first_k_dense_replace = 1)
    c = m.config
    T = own.shape[0]
    vllm = np.zeros((T - 1, c.num_hidden_layers, c.num_experts_per_tok), dtype=np.uint8)
    vllm[:, c.first_k_dense_replace:] = own[:-1].numpy()
    got = from_vllm(vllm, range(c.first_k_dense_replace, c.num_hidden_layers), T)
    assert got.dtype == torch.int16 and got.shape == own.shape
    assert torch.equal(got[:-1], own[:-1]) and (got[-1] == UNROUTED).all()
    with pytest.raises(ValueError, match="do not cover"):
        from_vllm(vllm[:, :1], range(1, 3), T)
