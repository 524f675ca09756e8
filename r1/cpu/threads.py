"""CPU threads: torch's intra-op thread count for a block, and micro-batches run side by side on worker threads
(a CPU run's update; r1.cpu.update_workers says how many)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch
from torch import Tensor


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n inside the block, the caller's restored after (errors included)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def update_workers(requested: int, device: torch.device, fsdp: bool) -> int:
    """How many micro-batches `micro_batches` runs side by side: `requested`, or for 0 (auto) 2 on a CPU with at
    least 2 intra-op threads, else 1. Always 1 on a GPU (one stream does it) and under FSDP2 (its hooks run
    collectives in every forward and backward, which two threads would interleave)."""
    if device.type != "cpu" or fsdp:
        return 1
    return max(1, requested) if requested else (2 if torch.get_num_threads() >= 2 else 1)


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (its threads, the pool): kept for the next call


def micro_batches(fn: Callable[[int], tuple[Tensor | None, Any]], n: int, params: Sequence[Tensor],
                  workers: int = 1,
                  context: Callable[[int], contextlib.AbstractContextManager] = lambda i: contextlib.nullcontext(),
                  ) -> list[Any]:
    """Run fn(i) -> (loss, out) for the micro-batches i = 0..n-1; add the gradient of every loss to the params'
    .grad and return the outs in order. A loss of None takes no gradient (log-probs under no_grad). `context(i)`
    is entered around micro-batch i's forward AND backward, on the thread that runs them (r1.compute's
    precision context is thread-local and must hold in backward too; r1.routing's replay holds i's experts).

    workers == 1: in order on this thread, loss.backward() after each.
    workers == W > 1 (CPU): W threads, each with 1/W of torch's intra-op threads; micro-batch i runs on thread
    i % W, which sums its micro-batches' gradients (autograd.grad) in order; then this thread adds the W sums to
    .grad in thread order. The result never depends on timing (equal bit for bit from run to run), but rounds
    differently from workers == 1. Why: a small model's micro-batch is made of ops too small to split well over
    cores (the smoke model's GRPO micro-batch: 130 ms on one thread, 88 on two, 1.5x), while two micro-batches
    side by side, one core each, overlap almost fully (torch releases the GIL inside its ops): the smoke GRPO
    step's update measured 385 -> 297 ms on 2 cores. Costs: W micro-batches' activations in memory at once.
    fn runs on a worker thread, so thread-local state (grad mode, autocast) is fn's to set, and module state a
    forward writes must be safe to write from two threads (CPUMoE's expert counts take a lock). If a micro-batch
    raises, the others finish, the error is raised here and .grad is left as it was."""
    if workers <= 1 or n <= 1:
        outs = []
        for i in range(n):
            with context(i):
                loss, out = fn(i)
                if loss is not None:
                    loss.backward()
            outs.append(out)
        return outs
    global _POOL
    W = min(workers, n)
    per = max(1, torch.get_num_threads() // W)

    def work(w: int) -> tuple[list[Tensor | None], dict[int, Any]]:
        torch.set_num_threads(per)  # this thread's OpenMP and MKL thread counts
        total: list[Tensor | None] = [None] * len(params)
        outs = {}
        for i in range(w, n, W):
            with context(i):
                loss, outs[i] = fn(i)
                grads = torch.autograd.grad(loss, params, allow_unused=True) if loss is not None else None
            if grads is not None:
                total = [a if g is None else g if a is None else a + g for a, g in zip(total, grads, strict=True)]
        return total, outs

    if _POOL is None or _POOL[0] < W:
        if _POOL is not None:
            _POOL[1].shutdown(wait=False)
        _POOL = W, ThreadPoolExecutor(W, thread_name_prefix="r1-micro-batch")
    with intra_op_threads(per):
        futures = [_POOL[1].submit(work, w) for w in range(W)]
        wait(futures)
        results = [f.result() for f in futures]  # the first error, once every worker has stopped
    outs: dict[int, Any] = {}
    for j, p in enumerate(params):
        g = None
        for total, _ in results:
            if total[j] is not None:
                g = total[j] if g is None else g + total[j]
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    for _, o in results:
        outs.update(o)
    return [outs[i] for i in range(n)]
