"""fp32 GEMM throughput on this CPU: torch's matmul (MKL) vs r1.cpu.gemm (oneDNN), for the shapes of the
bench model's linears (4096 tokens) and experts (1024 rows each), in one process.

For each y = x W^T ([M, K] . [N, K]^T) it times the forward, dgrad (dy W) and wgrad (dy^T x) GEMMs, best of
5 runs of 10 calls, and prints GFLOP/s. MKL_VERBOSE=1 shows which MKL code path runs.
Usage: python bench/gemm.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import pick_gemm, report  # noqa: E402

from r1.cpu.gemm import mm_nt, usable, wgrad  # noqa: E402

SHAPES = {  # name: (M, K, N)
    "q_a_proj": (4096, 256, 128), "q_b_proj": (4096, 128, 384), "kv_a_proj": (4096, 256, 80),
    "kv_b_proj": (4096, 64, 512), "o_proj": (4096, 256, 256), "mlp up": (4096, 256, 1024),
    "mlp down": (4096, 1024, 256), "expert gate_up": (1024, 256, 512), "expert down": (1024, 256, 256),
    "lm_head": (4096, 256, 4096),
}


def best_seconds(fn: Callable[[], object], calls: int = 10, runs: int = 5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def pairs(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> dict[str, tuple[Callable[[], object], ...]]:
    """The three GEMMs of a linear, each as (torch's matmul, oneDNN)."""
    return {"forward": (lambda: x @ w.T, lambda: mm_nt(x, w)),
            "dgrad": (lambda: dy @ w, lambda: mm_nt(dy, w.T)),
            "wgrad": (lambda: dy.T @ x, lambda: wgrad(dy, x))}


def main() -> None:
    torch.manual_seed(0)
    default = pick_gemm("auto")  # what r1 picks on this CPU; the comparison forces oneDNN on
    pick_gemm("onednn")
    probe = torch.zeros(1)
    if not usable(probe, probe):
        sys.exit("this torch has no oneDNN fp32 linear on this machine: nothing to compare")
    print(f"GFLOP/s, fp32, {torch.get_num_threads()} threads: torch (MKL) / oneDNN "
          f"(r1 picks {default} on this CPU: {torch.backends.cpu.get_cpu_capability()})")
    print(f"{'':16}{'M,K,N':>16}{'forward':>16}{'dgrad':>16}{'wgrad':>16}")
    results = {}
    for name, (M, K, N) in SHAPES.items():
        gf = 2 * M * K * N / 1e9
        fns = pairs(torch.randn(M, K), torch.randn(N, K), torch.randn(M, N))
        row = {k: (gf / best_seconds(a), gf / best_seconds(b)) for k, (a, b) in fns.items()}
        results[name] = {k: {"mkl": v[0], "onednn": v[1]} for k, v in row.items()}
        print(f"{name:16}{f'{M},{K},{N}':>16}" + "".join(f"{f'{a:.0f} / {b:.0f}':>16}" for a, b in row.values()))
    report("gemm", results, {"threads": torch.get_num_threads(), "default": default,
                             "cpu_capability": torch.backends.cpu.get_cpu_capability()})


if __name__ == "__main__":
    main()
