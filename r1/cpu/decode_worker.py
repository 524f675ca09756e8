"""A second decoding process for the CPU torch engine (r1/cpu/engine.py): a call's prompts split over two cores.

Why: a decode step of a small model is a few hundred ops of a few microseconds each, so a second intra-op thread
barely helps (the smoke model, 128 rows: one thread as fast as two) and the second core idles. Two Python threads
would each decode half the rows but hand the GIL over at every op, and on this VM each handoff wakes a sleeping
thread: two threads of 64 rows took 487 ms, one process of 128 rows 275. A process has its own interpreter.
Measured (2 cores, smoke model, 16 prompts x 8 samples x 48 tokens, alternating): one process with two threads
269 ms; this process and the worker, one thread each, 227 ms.

The worker decodes with a replica of the model held in shared memory. Before each call the engine copies the
model's current state (parameters and buffers, ~1 ms for the smoke model) into it, so in-place updates by the
trainer, a resumed checkpoint or `load_weights` all reach it. It is started on first use (spawn, ~2 s once), is
a daemon (it ends with this process), and stops when the engine sleeps or is garbage-collected. Its rows sample
from per-sample generators seeded by the sample's index in the whole call (rollouts/sampling.py), so a split
call draws the same tokens as an unsplit one; log-probs can differ in the last bits (other GEMM row counts).
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.multiprocessing as mp  # registers the reductions that pass shared-memory tensors to the worker
from torch import nn

from rollouts.base import SamplingParams
from rollouts.torch_engine import Result, TorchEngine


class WorkerDied(RuntimeError):
    """The worker process ended without answering (killed, out of memory)."""


def _serve(model: nn.Module, tokenizer: Any, conn: Any, eos_ids: list[int], pad_id: int) -> None:
    torch.set_num_threads(1)
    # the tokenizer matches stop strings as the engine's own does
    engine = TorchEngine(model, tokenizer, eos_token_id=eos_ids, pad_token_id=pad_id)
    while (msg := conn.recv()) is not None:
        prompts, sampling, n, first = msg
        cpu = time.process_time()
        try:
            with torch.inference_mode():
                out = engine._run(prompts, sampling, n, first)
        except Exception as e:  # noqa: BLE001 - any failure goes back to the caller, as text (it may not pickle)
            conn.send(RuntimeError(f"{type(e).__name__}: {e}\n{''.join(traceback.format_tb(e.__traceback__))}"))
            continue
        conn.send((out, time.process_time() - cpu))


class DecodeWorker:
    """The worker process and the shared replica it decodes with."""

    def __init__(self, model: nn.Module, tokenizer: Any, eos_ids: list[int], pad_id: int):
        self.replica = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self.replica.parameters():
            p.grad = None  # (deepcopy copies a gradient the model may hold)
        self.replica.share_memory()
        self._state = self.replica.state_dict()  # views of the shared storage: copy_ into them reaches the worker
        ctx = mp.get_context("spawn")  # fork would copy torch's OpenMP pool in an unusable state
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(self.replica, tokenizer, child, eos_ids, pad_id), daemon=True,
                                   name="r1-decode-worker")
        self.process.start()
        child.close()
        self.cpu_seconds = 0.0  # the worker's CPU time over its calls (this process's process_time() misses it)

    @torch.no_grad()
    def submit(self, model: nn.Module, prompts: Sequence[Sequence[int]], sampling: SamplingParams, n: int,
               first: int) -> None:
        """Sync the replica to `model`, then start decoding `prompts` (samples numbered from `first`)."""
        for k, t in model.state_dict().items():
            self._state[k].copy_(t)
        try:
            self.conn.send(([list(p) for p in prompts], sampling, n, first))
        except OSError:  # a broken pipe: it has died since the last call
            raise WorkerDied(f"the decode worker process died (exit code {self.process.exitcode})") from None

    def result(self) -> Result:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(1)
            raise WorkerDied(f"the decode worker process died (exit code {self.process.exitcode})") from None
        if isinstance(msg, Exception):
            raise RuntimeError(f"the decode worker failed: {msg}")
        out, cpu = msg
        self.cpu_seconds += cpu
        return out

    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(5)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
        self.conn.close()
