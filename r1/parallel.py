"""Processes, sharding and state dicts for `accelerate launch`: see Dist. Kept outside the model and the trainer
loop, as gpt-fast keeps parallelism outside its model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch
from torch import Tensor, nn


class Dist:
    """The processes `accelerate launch` started (gloo on CPU, nccl on GPU; one process is the plain case).

    Data parallel (default): every rank holds the whole model, rolls out its own prompts and runs the same number
    of micro-batches; gradients are averaged in one flat all-reduce per optimizer step (after all micro-batches, so
    accumulation costs no extra communication, and the output head may be used outside forward()).
    FSDP2 (an accelerate config with distributed_type FSDP): `wrap` shards every decoder block and the root with
    torch's fully_shard; gradients are reduce-scattered in backward, and state dicts are gathered in full.
    """

    def __init__(self) -> None:
        from accelerate import PartialState

        # cpu=True lets accelerate pick gloo (MULTI_CPU) for torchrun-started processes on a machine without a GPU
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, self.state.device
        self.main = self.state.is_main_process
        self.fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and self.world > 1
        # bf16 compute where accelerate asks for it and a GPU runs it; the CPU path stays fp32
        self.bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16" and torch.cuda.is_available()

    def wrap(self, model: nn.Module) -> nn.Module:
        """FSDP2: shard each decoder block, then the root (embeddings, final norm, head, MTP)."""
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.bf16 else None, reduce_dtype=torch.float32)
        inner = getattr(model, "model", model)  # transformers keeps the layers under .model
        for block in inner.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", torch.bfloat16) if self.bf16 and not self.fsdp else contextlib.nullcontext()

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, {"sum": torch.distributed.ReduceOp.SUM,
                                             "max": torch.distributed.ReduceOp.MAX}[op])
        return t

    def average_grads(self, model: nn.Module) -> None:
        if self.world == 1 or self.fsdp:  # FSDP2 has reduce-scattered them in backward
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
        flat = torch.cat([g.flatten() for g in grads]) / self.world
        self.all_reduce(flat)
        for p, g in zip((p for p in model.parameters() if p.requires_grad), flat.split([g.numel() for g in grads]),
                        strict=True):
            p.grad = g.view_as(p)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return metrics
        keys = sorted(metrics)
        t = self.all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device))
        return {k: v / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def full_state(self, model: nn.Module, opt: torch.optim.Optimizer | None = None,
                   everywhere: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Unsharded model (and optimizer) state dicts; a collective under FSDP. On rank 0 only, in CPU memory,
        unless `everywhere`."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        o = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere and self.world > 1)
        msd = get_model_state_dict(model, options=o)
        return msd, None if opt is None else get_optimizer_state_dict(model, opt, options=o)

    def load_state(self, model: nn.Module, opt: torch.optim.Optimizer, msd: dict[str, Any],
                   osd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True))
        # parameters that never had a gradient (MTP in GRPO) have no optimizer state yet: not an error
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True, strict=False))

    def same_parameters(self, model: nn.Module) -> bool:
        """True when every rank holds bit-identical parameters (max == min of a per-rank checksum); under FSDP the
        gathered full parameters are compared."""
        params = list(self.full_state(model, everywhere=True)[0].values()) if self.fsdp else \
            [p.detach() for p in model.parameters()]
        s = torch.stack([p.double().sum() + (p.double() ** 2).sum() for p in params if p.is_floating_point()])
        s = s.to(self.device)
        lo, hi = s.clone(), s.clone()
        self.all_reduce(hi, "max")
        self.all_reduce(lo.neg_(), "max")
        return bool(torch.equal(hi, -lo))


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
                  workers: int = 1) -> list[Any]:
    """Run fn(i) -> (loss, out) for the micro-batches i = 0..n-1; add the gradient of every loss to the params'
    .grad and return the outs in order. A loss of None takes no gradient (log-probs under no_grad).

    workers == 1: in order on this thread, loss.backward() after each.
    workers == W > 1 (CPU): W threads, each with 1/W of torch's intra-op threads; micro-batch i runs on thread
    i % W, which sums its micro-batches' gradients (autograd.grad) in order; then this thread adds the W sums to
    .grad in thread order. The result never depends on timing (equal bit for bit from run to run), but rounds
    differently from workers == 1. Why: a small model's micro-batch is made of ops too small to split well over
    cores (the smoke model's GRPO micro-batch: 130 ms on one thread, 88 on two, 1.5x), while two micro-batches
    side by side, one core each, overlap almost fully (torch releases the GIL inside its ops): the smoke GRPO
    step's update measured 385 -> 297 ms on 2 cores. Costs: W micro-batches' activations in memory at once.
    fn runs on a worker thread, so thread-local state (grad mode, autocast) is fn's to set, and module state a
    forward writes must be safe to write from two threads (MoE's expert counts take a lock). If a micro-batch
    raises, the others finish, the error is raised here and .grad is left as it was."""
    if workers <= 1 or n <= 1:
        outs = []
        for i in range(n):
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
            loss, outs[i] = fn(i)
            if loss is not None:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
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
