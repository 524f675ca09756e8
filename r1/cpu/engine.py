"""The torch engine on a CPU: a call's prompts split over two processes, tiny decode steps on one thread.

r1.cpu.accelerate_engine turns a TorchEngine whose model is on the CPU into a CPUTorchEngine (same model, tokenizer,
stop and pad ids). Its samples are those of the TorchEngine: each sample's generator is seeded by its index in the
whole call (rollouts/sampling.py), whichever process decodes it.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from r1.cpu.decode_worker import DecodeWorker, WorkerDied
from r1.cpu.threads import intra_op_threads
from r1.model import V3ForCausalLM
from r1.model.model import GroupedExperts
from rollouts.base import SamplingParams
from rollouts.torch_engine import Result, TorchEngine

# A decode step whose GEMMs total at most this many multiply-adds runs on one CPU thread: its ~200 ops then take
# a few microseconds each, and an OpenMP fork/join per op costs more than the second core gives back. Measured
# (whole generate calls, alternating in one process, 2 cores): the tiny V3 (134k multiply-adds a token) at 8 rows
# 118 ms on one thread vs 166 on two; at 16 rows even (145-172 vs 150-195 over four runs); at 32 rows 205 vs 186.
ONE_THREAD_DECODE_MACS = 1 << 21
# A call whose rows' multiply-adds per decoded token reach this splits its prompts with a decode worker process when
# `processes` is auto (r1/cpu/decode_worker.py): the smoke GRPO step (128 rows x 430k) is 55M; a tiny test call
# stays in one process (the worker's start, ~2 s, would cost more than it saves).
SPLIT_DECODE_MACS = 1 << 24


def macs_per_token(model: nn.Module) -> int:
    """Multiply-adds of one decoded token through the model's GEMMs, i.e. the matrix weights it reads: routed
    experts count for the k of E a token uses; embeddings (one row read) and MTP modules (not run) not at all."""
    k_of_e = 1.0
    if isinstance(model, V3ForCausalLM):
        k_of_e = model.config.num_experts_per_tok / model.config.n_routed_experts
    total = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) or name.startswith("mtp."):
            continue
        own = sum(p.numel() for p in m.parameters(recurse=False) if p.dim() >= 2)
        total += own * (k_of_e if isinstance(m, GroupedExperts) else 1.0)
    return int(total)


class CPUTorchEngine(TorchEngine):
    def __init__(self, model: nn.Module, tokenizer: object | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, processes: int = 0, return_routed_experts: bool = False):
        """processes: 1 decodes in this process only; 2 splits every call of two or more prompts with a decode
        worker (native V3 model on a CPU); 0 (auto) splits on a CPU with >= 2 threads when the call reaches
        SPLIT_DECODE_MACS."""
        if processes not in (0, 1, 2):
            raise ValueError(f"processes must be 0 (auto), 1 or 2, not {processes}")
        super().__init__(model, tokenizer, eos_token_id, pad_token_id, return_routed_experts=return_routed_experts)
        self.processes = processes
        self._worker: DecodeWorker | None = None
        self.macs_per_token = macs_per_token(model)

    @classmethod
    def from_engine(cls, engine: TorchEngine) -> CPUTorchEngine:
        return cls(engine.model, engine.tokenizer, eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id,
                   return_routed_experts=engine.return_routed_experts)

    def _run(self, prompts: Sequence[Sequence[int]], sp: SamplingParams, n: int, first: int = 0) -> Result:
        if first == 0 and self._splits(len(prompts), n):
            return self._split_run(prompts, sp, n)
        return super()._run(prompts, sp, n, first)

    def _decoding(self, rows: int) -> contextlib.AbstractContextManager:
        # a tiny decode step runs on one thread (ONE_THREAD_DECODE_MACS); the prefill used them all
        cpu = next(self.model.parameters()).device.type == "cpu"
        return intra_op_threads(1) if cpu and rows * self.macs_per_token <= ONE_THREAD_DECODE_MACS \
            else contextlib.nullcontext()

    def _splits(self, n_prompts: int, n: int) -> bool:
        # routing is recorded in this process only
        if self.processes == 1 or n_prompts < 2 or not isinstance(self.model, V3ForCausalLM) or \
                self.return_routed_experts or \
                next(self.model.parameters()).device.type != "cpu":
            return False
        return self.processes == 2 or (torch.get_num_threads() >= 2 and
                                       n_prompts * n * self.macs_per_token >= SPLIT_DECODE_MACS)

    def _split_run(self, prompts: Sequence[Sequence[int]], sp: SamplingParams, n: int) -> Result:
        """The first half of the prompts here, the rest in the decode worker, one thread each. A worker that cannot
        start (e.g. no room in /dev/shm for the replica) turns splitting off with a warning; one that dies during
        the call has its half decoded here (the same samples: they are seeded by index) and is replaced next call."""
        if self._worker is not None and not self._worker.alive():
            self.close()
        if self._worker is None:
            try:
                self._worker = DecodeWorker(self.model, self.tokenizer, self.eos_ids, self.pad_id)
            except (OSError, RuntimeError) as e:
                warnings.warn(f"r1: the decode worker process did not start ({e}); decoding in this process only",
                              stacklevel=3)
                self.processes = 1
                return super()._run(prompts, sp, n)
            self._finalizer = weakref.finalize(self, self._worker.close)
        half = (len(prompts) + 1) // 2
        try:
            self._worker.submit(self.model, prompts[half:], sp, n, first=half * n)
        except WorkerDied as e:
            warnings.warn(f"r1: {e}; decoding this call in this process", stacklevel=3)
            self.close()
            return super()._run(prompts, sp, n)
        try:
            with intra_op_threads(1):
                mine = super()._run(prompts[:half], sp, n)
        except BaseException:
            with contextlib.suppress(Exception):
                self._worker.result()  # its answer is read all the same: the pipe stays in step
            raise
        try:
            theirs = self._worker.result()
        except WorkerDied as e:
            warnings.warn(f"r1: {e}; decoding its half in this process", stacklevel=3)
            self.close()
            theirs = super()._run(prompts[half:], sp, n, first=half * n)
        return (torch.cat([mine[0], theirs[0]]), torch.cat([mine[1], theirs[1]]), mine[2] + theirs[2],
                mine[3] + theirs[3])

    def close(self) -> None:
        """Stop the decode worker, if one runs (the next split call starts a new one)."""
        if self._worker is not None:
            self._finalizer.detach()
            self._worker.close()
            self._worker = None

    def sleep(self) -> None:
        self.close()  # the decode worker's replica and caches
        super().sleep()
