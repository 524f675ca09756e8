"""Forward + backward of one V3 config: ours vs transformers' DeepseekV3ForCausalLM, same weights.

Config (the "bench" preset): hidden 256, 4 layers (1 dense), 16 routed experts top-4 + 1 shared,
seq 512, batch 8, fp32, next-token loss. MTP and the sequence-wise balance loss are off on our side
because transformers has neither. Runs alternate in one process; medians are reported, with the
process CPU time per step (less sensitive than wall time to other jobs on a shared machine).
Our model runs its fp32 GEMMs as r1's loaders set it up: oneDNN where the CPU has AVX-512, else torch's (MKL).
Usage: python bench/model_step.py [--repeats 5] [--batch 8] [--seq 512] [--gemm auto|onednn|torch]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _v3ref import hf_copy, randomize  # noqa: E402
from common import GEMM_CHOICE, alternate, peak_bytes, pick_gemm, report  # noqa: E402

from r1.cpu import accelerate  # noqa: E402
from r1.logprobs import lm_loss  # noqa: E402
from r1.model.config import PRESETS  # noqa: E402
from r1.model.model import V3ForCausalLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--gemm", choices=GEMM_CHOICE, default="auto",
                    help="fp32 GEMMs as r1's loaders pick them (auto: oneDNN where the CPU has AVX-512, "
                         "r1/cpu/gemm.py), or forced onto oneDNN or torch's matmul (MKL)")
    args = ap.parse_args()
    gemm = pick_gemm(args.gemm)
    torch.manual_seed(0)
    c = PRESETS["bench"].replace(seq_aux_loss_alpha=0.0, num_nextn_predict_layers=0)
    ours = randomize(V3ForCausalLM(c)).train()
    ref = hf_copy(ours, attn="sdpa").train()  # transformers' default attention
    accelerate(ours)  # as r1's loaders build it: the CPU layer (r1/cpu)
    ids = torch.randint(0, c.vocab_size, (args.batch, args.seq))

    def step_ours() -> None:
        loss, _ = lm_loss(ours(ids), ours.lm_head.weight, ids)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def step_ref() -> None:
        ref(ids, labels=ids).loss.backward()
        ref.zero_grad(set_to_none=True)

    # same loss on the same weights before timing anything
    with torch.no_grad():
        l1 = lm_loss(ours(ids, mtp=False), ours.lm_head.weight, ids)[0].item()
        l2 = ref(ids, labels=ids).loss.item()
    assert abs(l1 - l2) < 1e-4, (l1, l2)
    cpu: dict[str, list[float]] = {"r1": [], "transformers": []}

    def cpu_timed(name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)
        return run

    t = alternate({k: cpu_timed(k, fn) for k, fn in (("r1", step_ours), ("transformers", step_ref))},
                  repeats=args.repeats)
    cpu_s = {k: statistics.median(v[1:]) for k, v in cpu.items()}  # [0]: the warm-up run
    mem = {"r1": peak_bytes(step_ours), "transformers": peak_bytes(step_ref)}
    tokens = args.batch * args.seq
    print(f"forward+backward, batch {args.batch} x seq {args.seq}, fp32, {torch.get_num_threads()} threads, "
          f"r1 GEMMs: {gemm} ({args.gemm}) "
          f"(loss r1 {l1:.4f} = transformers {l2:.4f})")
    print(f"{'':14}{'ms/step':>10}{'tokens/s':>11}{'peak MiB':>10}{'CPU ms':>10}")
    for k in t:
        print(f"{k:14}{t[k] * 1e3:10.1f}{tokens / t[k]:11.0f}{mem[k] / 2**20:10.1f}{cpu_s[k] * 1e3:10.1f}")
    ratio, mratio = t["r1"] / t["transformers"], mem["r1"] / mem["transformers"]
    print(f"time ratio r1/transformers = {ratio:.2f}x (target <= 0.6), peak memory ratio = {mratio:.2f}x "
          f"(target <= 1), CPU time ratio = {cpu_s['r1'] / cpu_s['transformers']:.2f}x")
    report("model_step", {k: {"ms": t[k] * 1e3, "peak_mib": mem[k] / 2**20} for k in t},
           {"batch": args.batch, "seq": args.seq, "gemm": gemm, "time_ratio": ratio, "mem_ratio": mratio,
            "cpu_ratio": cpu_s["r1"] / cpu_s["transformers"]})


if __name__ == "__main__":
    main()
