"""Shared helpers for the side-by-side benchmarks: timing by alternating runs, peak memory."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors alive at once during fn, above what was alive before, from the torch
    profiler's allocation events (a CPU build has no allocator statistics)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # walk the allocation events in order, keeping a running total. Self bytes only: an op's
    # cpu_memory_usage includes its children's (matmul -> mm -> empty would count one buffer 2-3 times).
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


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

