"""Shared helpers for the side-by-side benchmarks: timing by alternating runs, peak memory."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors alive at once while fn runs, above what was alive before: a running sum of
    the torch profiler's raw allocation (+) and free (-) records in time order (a CPU build has no allocator
    statistics). Summing FunctionEvent.cpu_memory_usage instead counts an allocation once per enclosing op
    (matmul -> mm -> empty: three times)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    cur = peak = 0
    for _, nbytes in records:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def cpu_seconds() -> float:
    """CPU seconds of this process and of its live child processes (the torch engine's decode worker:
    r1/cpu/decode_worker.py), which time.process_time() alone would miss. Children from /proc (Linux)."""
    import multiprocessing
    import os

    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            fields = open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, run in alternation so drift hits both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(name: str, rows: dict[str, dict[str, float]], extra: dict[str, object]) -> None:
    print(json.dumps({"bench": name, **extra, "results": rows}))


def threads() -> int:
    return torch.get_num_threads()


GEMM_CHOICE = ("auto", "onednn", "torch")


def pick_gemm(choice: str) -> str:
    """--gemm: "auto" keeps r1's CPU-based choice (oneDNN where the CPU has AVX-512: r1/cpu/gemm.py), "onednn" and
    "torch" (MKL) force one; returns what the fp32 GEMMs of `r1.cpu.accelerate`d models will run on."""
    from r1.cpu import gemm

    gemm.prefer({"auto": None, "onednn": True, "torch": False}[choice])
    return "onednn" if gemm.ENABLED else "torch"

