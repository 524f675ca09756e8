"""Rollout routing replay (R3, arXiv 2510.11370) for the native V3 model, applied from outside it.

In MoE RL the engine that samples and the trainer that updates can send a token to different experts (other
kernels, FP8 rollouts, a stale engine), and the importance ratio then measures routing noise, not policy change.
R3 records the engine's expert choices and makes the training forward use them. The gate weights stay the
training router's scores on those experts (normalised as V3 does), so the router keeps learning, and the balancing
counts and the balance loss see the replayed choices (MoE.forward takes them from the router's output).

Layout: one sequence's routed experts are [tokens, moe_layers, top_k] int16, vLLM's
CompletionOutput.routed_experts layout; -1 marks a token no forward consumed (a sample's last token), where the
training router's own choice stands. moe_layers are the decoder's MoE layers in order (MTP modules excluded: the
engine never runs them).

Both record and replay are forward hooks on the routers (`moe_routers`). Replay holds one routing per forward
call, [B, T, L, K] for the model's [B, T] tokens; keep it active through backward when activation checkpointing
recomputes the routers there. One replay per model at a time (not for two micro-batches on two threads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from r1.model.model import MoE, Router

UNROUTED = -1  # a token without recorded experts


def moe_routers(model: nn.Module) -> list[Router]:
    """The router of every MoE decoder layer, in layer order (empty for a dense or a transformers model)."""
    layers = getattr(model, "layers", None) or []
    return [blk.mlp.gate for blk in layers if isinstance(getattr(blk, "mlp", None), MoE)]


def from_vllm(routed_SLK: Any, moe_layers: range | list[int], tokens: int) -> Tensor:
    """vLLM's CompletionOutput.routed_experts -> r1's layout. vLLM (0.32, `enable_return_routed_experts`) returns
    [tokens - 1, num_hidden_layers, top_k] uint8 / uint16 (numpy): every decoder layer, dense ones unwritten, and
    no row for the last token, which no forward consumed. Here: the MoE layers' columns, [tokens, L, K] int16, the
    last row UNROUTED. `moe_layers`: their decoder indices (V3: first_k_dense_replace .. num_hidden_layers - 1)."""
    t = torch.as_tensor(routed_SLK)
    if t.dim() != 3 or t.shape[0] not in (tokens - 1, tokens) or t.shape[1] <= max(moe_layers):
        raise ValueError(f"vLLM routed_experts of shape {tuple(t.shape)} do not cover {tokens} tokens x layers "
                         f"{moe_layers[0]}..{moe_layers[-1]} (expected [tokens - 1, num_hidden_layers, top_k])")
    out = torch.full((tokens, len(moe_layers), t.shape[2]), UNROUTED, dtype=torch.int16)
    out[:t.shape[0]] = t[:, list(moe_layers)].to(torch.int16)
    return out


class RoutingRecorder:
    """Inside `with RoutingRecorder(model) as rec:`, each forward of the model leaves its expert choices;
    `rec.take()` returns the last forward's as [N, L, K] int16 (N = its B * T tokens, row-major) and clears them."""

    def __init__(self, model: nn.Module):
        self.routers = moe_routers(model)
        if not self.routers:
            raise ValueError(f"routing needs a native MoE model; {type(model).__name__} has no MoE layer")
        self.top_k = self.routers[0].c.num_experts_per_tok
        self.calls: list[Tensor | None] = [None] * len(self.routers)
        self._hooks: list[Any] = []
        # what an engine stitches per sample (TorchEngine: [P, Tp, L, K] prompts, [N, M, L, K] completions)
        self.prompts_PTLK: Tensor | None = None
        self.completions_NMLK: Tensor | None = None

    def __enter__(self) -> RoutingRecorder:
        for layer, router in enumerate(self.routers):
            self._hooks.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, layer: int):
        def record(module: nn.Module, args: tuple, out: tuple[Tensor, Tensor, Tensor]) -> None:
            self.calls[layer] = out[1].detach().to(torch.int16)
        return record

    def take(self) -> Tensor:
        if any(c is None for c in self.calls):
            raise RuntimeError("no forward recorded since the last take()")
        out = torch.stack(self.calls, dim=1)  # type: ignore[arg-type]
        self.calls = [None] * len(self.routers)
        return out


class _Replay:
    """Per router: the recorded experts of the current forward and the agreement tally."""

    def __init__(self, experts_NK: Tensor):
        self.experts_NK = experts_NK
        self.same = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64)


def _replay_hook(state: dict[Router, _Replay]):
    def replay(router: Router, args: tuple, out: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        w_NK, idx_NK, scores_NE = out
        r = state[router]
        rec_NK = r.experts_NK.to(idx_NK.device)
        if rec_NK.shape != idx_NK.shape:
            raise ValueError(f"routing replay: the recorded experts are {tuple(rec_NK.shape)} (tokens, top_k), the "
                             f"forward routes {tuple(idx_NK.shape)}")
        known_N = rec_NK[:, 0] != UNROUTED
        with torch.no_grad():  # agreement of the router's own top-k set with the recorded one
            same_N = (rec_NK.long().sort(-1).values == idx_NK.sort(-1).values).all(-1)
            r.same += (same_N & known_N).sum().double().cpu()
            r.total += known_N.sum().double().cpu()
        idx_NK = torch.where(known_N[:, None], rec_NK.long(), idx_NK)
        w_NK = scores_NE.gather(1, idx_NK)  # the training router's scores on the replayed experts: it still learns
        c = router.c
        if c.norm_topk_prob:
            w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
        return w_NK * c.routed_scaling_factor, idx_NK, scores_NE
    return replay


class RoutingReplay:
    """`with RoutingReplay(model, experts_BTLK) as rp:` routes every forward of `model` over those [B, T] tokens
    with the recorded experts (UNROUTED tokens keep the router's choice). `rp.agreement()`: the share of recorded
    (token, layer) pairs whose top-k set the router chose itself (moe/routing_agreement)."""

    def __init__(self, model: nn.Module, experts_BTLK: Tensor):
        routers = moe_routers(model)
        if experts_BTLK.dim() != 4 or experts_BTLK.shape[2] != len(routers):
            raise ValueError(f"routing replay: expected [B, T, {len(routers)} MoE layers, top_k] experts, got "
                             f"{tuple(experts_BTLK.shape)}")
        K = experts_BTLK.shape[-1]
        self.state = {r: _Replay(experts_BTLK[:, :, layer].reshape(-1, K)) for layer, r in enumerate(routers)}
        self._hooks: list[Any] = []

    def __enter__(self) -> RoutingReplay:
        hook = _replay_hook(self.state)
        self._hooks = [r.register_forward_hook(hook) for r in self.state]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def tally(self) -> tuple[float, float]:
        """(recorded (token, layer) pairs whose top-k set the router chose itself, recorded pairs), all forwards."""
        return sum(float(r.same) for r in self.state.values()), sum(float(r.total) for r in self.state.values())

    def agreement(self) -> float:
        same, total = self.tally()
        return same / total if total else 1.0
