"""What this machine cannot run, run on tensors that hold no data (torch's FakeTensorMode): `r1 model --simulate`.

Every op still checks its shapes, dtypes and devices and allocates (fake) storage, so a step of the real code shows
where it breaks, how much memory it holds and how many FLOPs it does, at any size, in seconds and without weights.
- The GPU path on device "cuda" (`fake_cuda`, `fake_model`): a tensor left on the CPU raises
  FakeTensorDeviceMismatchError, CPU-only code reached with CUDA tensors fails. `HostSyncs` records each host
  synchronisation (`.item()`, `.tolist()`, a data-dependent shape such as bincount's or unique's) where the code
  makes it, and lets the step go on with a stand-in (the op's result on zeros).
- Memory at size (`simulate`): one GRPO update micro-batch (r1.trainer.micro_batch_loss, backward, grad-norm clip,
  AdamW step) of the model as r1.runs.prepare_model makes it ready, sharded by FSDP2 over a fake world of N ranks
  (process group "fake": collectives move no data; one process plays rank 0). torch's FSDPMemTracker (MemTracker
  on one rank) gives rank 0's peak by kind; FlopCounterMode counts the step's FLOPs. These run on fake CPU tensors:
  FSDP2 on fake CUDA aborts in this torch. So the compute is the CPU's choice of kernels (SDPA's flash kernel for the
  CPU saves what a GPU's does) and fp8 runs the emulated backend (the same fp8 copies saved for backward).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time
import traceback
import unittest.mock
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map_only

from r1.model.config import V3Config, count_params
from r1.model.model import V3ForCausalLM
from r1.plan import GIB, MemoryPlan, PlanSpec

_REPO = str(Path(__file__).resolve().parents[1])
_CUDA, _META = 1, 14  # c10::DeviceType


# ---------------------------------------------------------------------------------------------- fake CUDA
@functools.cache
def fake_cuda() -> None:
    """Let fake tensors on "cuda" be indexed in a CPU-only torch. Python indexing (x[:, :H]) enters a device guard,
    and this build registers none for CUDA ("PyTorch is not linked with support for cuda devices"); torch's own
    fix, c10::impl::ensureCUDADeviceGuardSet (which FakeTensorMode calls), installs a no-op guard only on CUDA
    builds without a GPU. The meta device's no-op guard goes into the empty CUDA slot instead. Nothing runs on it:
    it only marks which device is current, and nothing here has one."""
    if torch.cuda.is_available():
        return
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    registry = (ctypes.c_void_p * (_META + 1)).in_dll(lib, "_ZN3c104impl26device_guard_impl_registryE")
    if not registry[_CUDA]:
        registry[_CUDA] = registry[_META]


def fake_model(c: V3Config, device: str | torch.device, dtype: torch.dtype) -> V3ForCausalLM:
    """The V3 model with every parameter a fake `dtype` tensor on `device` (buffers keep their dtype), for use inside
    an active FakeTensorMode. Built on the meta device, then each tensor made afresh: random init and `to_empty` do
    not run on fake CUDA in a CPU-only torch. Tied weights stay tied."""
    with torch.device("meta"):
        model = V3ForCausalLM(c)
    made: dict[int, Tensor] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype),
                                               requires_grad=p.requires_grad)
                m._parameters[name] = made[id(p)]
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, device=device, dtype=b.dtype)
    return model


# ---------------------------------------------------------------------------------------------- host syncs
class HostSyncs(TorchDispatchMode):
    """Records every op that needs its data on the host (under FakeTensorMode: the ops that raise
    DataDependentOutputException or DynamicOutputShapeException), and returns the op's result on zeros instead
    (`.item()` -> 0, unique -> one row, nonzero -> none), so that the step runs on. Enter it inside the
    FakeTensorMode. `sites`: one "path:line in function" per sync, the innermost frame of the project's code
    (a `.tolist()`, one per element at the op level, counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []
        self._last: tuple[int, int] | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            self._record(func)
            return self._on_zeros(func, args, kwargs)
        self._last = None
        return out

    def _record(self, func: Any) -> None:
        frame = next((f for f, _ in traceback.walk_stack(None)
                      if f.f_code.co_filename.startswith(_REPO) and f.f_code.co_filename != __file__), None)
        key = (id(frame), frame.f_lineno) if frame is not None else None
        if key is not None and key == self._last:  # the next element of the same .tolist()
            return
        self._last = key
        where = "?" if frame is None else \
            f"{os.path.relpath(frame.f_code.co_filename, _REPO)}:{frame.f_lineno} in {frame.f_code.co_name}"
        self.sites.append(f"{where} ({func.__name__.split('.')[0]})")

    @staticmethod
    def _on_zeros(func: Any, args: tuple, kwargs: dict) -> Any:
        device = next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
        with _disable_current_modes():
            zeros = functools.partial(tree_map_only, FakeTensor, lambda t: torch.zeros(t.shape, dtype=t.dtype))
            out = func(*zeros(args), **zeros(kwargs))
        return tree_map_only(Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device=device), out)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[s] = out.get(s, 0) + 1
        return out


@contextlib.contextmanager
def even_expert_splits(model: nn.Module, syncs: HostSyncs) -> Iterator[None]:
    """FP8 routed experts (r1.fp8.Fp8GroupedExperts) read each expert's row count on the host (one `.tolist()` per
    layer, recorded in `syncs`) to split their per-expert GEMMs, the GPU's path. Fake routing has no counts: each
    layer is handed an even split of its rows as a host tensor instead (the counts add up, as real ones do)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from r1.fp8 import Fp8GroupedExperts

    def even(m: nn.Module, args: tuple) -> tuple:
        rows, E = args[0].shape[0], args[1].shape[0]
        syncs.sites.append("r1/fp8.py in Fp8GroupedExperts.forward (tolist)")
        with unset_fake_temporarily():
            return args[0], torch.tensor([rows // E + (e < rows % E) for e in range(E)])

    hooks = []
    for m in model.modules():
        if isinstance(m, Fp8GroupedExperts):
            m.grouped = False  # the GPU's per-expert loop, not the CPU's grouped GEMM (equal bit for bit)
            hooks.append(m.register_forward_pre_hook(even))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------- the steps
def update_batch(c: V3Config, rows: int, prompt: int, completion: int, device: str | torch.device) -> Any:
    """A GRPO update batch (r1.trainer.UpdateBatch) of `rows` sequences of prompt + completion tokens, every token
    real (the attention mask all ones), mu = 1, no reference model, engine log-probs for TIS."""
    from r1.trainer import UpdateBatch

    ids = torch.randint(3, c.vocab_size, (rows, prompt + completion), device=device)
    return UpdateBatch(ids=ids, attn=torch.ones_like(ids), cmask=torch.ones(rows, completion, device=device),
                       elogp=-torch.rand(rows, completion, device=device), adv=torch.randn(rows, device=device),
                       old=None, ref=None, prompt_len=prompt, num_seq=float(rows), num_tok=float(rows * completion))


def grpo_micro_batch(model: nn.Module, batch: Any, precision: str, shared_prefix: bool = False) -> Tensor:
    """The update's micro-batch as r1.trainer.update runs it: micro_batch_loss (log-probs, clipped DAPO loss), then
    backward. Returns the loss."""
    from r1.trainer import TrainConfig, micro_batch_loss

    cfg = TrainConfig(precision=precision, micro_batch=batch.ids.shape[0], max_tokens=batch.cmask.shape[1],
                      shared_prefix=shared_prefix)
    loss, _ = micro_batch_loss(model, cfg, batch, None, shared_prefix, 0)  # type: ignore[arg-type]
    loss.backward()
    return loss


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, max_grad_norm: float = 1.0) -> Tensor:
    """What r1.trainer.update does after the micro-batches: clip the gradient norm, step, drop the gradients."""
    from r1.optim import clip_grad_norm_

    norm = clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    return norm


def hold_gradients_and_state(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Gradients as an earlier micro-batch of the optimizer step leaves them (GRPO gives the MTP modules none), then
    AdamW's state as a first step leaves it: the micro-batch that follows meets its peak with both held."""
    for name, p in model.named_parameters():
        p.grad = None if name.startswith("mtp.") or not p.requires_grad else torch.zeros_like(p)
    opt.step()


# ---------------------------------------------------------------------------------------------- FLOPs
def _grouped_mm_flop(a_shape: tuple, b_shape: tuple, *args: Any, out_shape: tuple, **kwargs: Any) -> int:
    """torch._grouped_mm: x [M, K] by w [E, K, N] (forward, dgrad); x^T [N, M] by y [M, K] grouped along M (wgrad,
    -> [E, N, K]); batched 3-D x 3-D. Each row meets one group, so the groups add up to one plain GEMM's work."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    n = 1
    for d in out_shape:
        n *= d
    return 2 * n * a_shape[-1]


def _cpu_flash_flop(q: tuple, k: tuple, v: tuple, dropout: float = 0.0, is_causal: bool = False, *args: Any,
                    out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v) // (2 if is_causal else 1)  # a causal kernel skips the upper triangle


def _cpu_flash_backward_flop(g: tuple, q: tuple, k: tuple, v: tuple, out: tuple, lse: tuple, dropout: float = 0.0,
                             is_causal: bool = False, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(g, q, k, v) // (2 if is_causal else 1)


def flop_counter() -> Any:
    """torch's FlopCounterMode, taught the ops it lacks that the model runs: torch._grouped_mm (routed experts) and
    the CPU's flash SDPA (what fake CPU tensors dispatch to), causal kernels counted as half."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._grouped_mm: _grouped_mm_flop,
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop})


def count_train_flops(c: V3Config, tokens: int) -> float:
    """FLOPs of a training micro-batch of one packed causal sequence of `tokens` (forward without MTP, log-probs of
    every next token, backward), counted by FlopCounterMode on fake tensors: what `r1 model`'s FLOPs per token
    estimate, times `tokens`."""
    from r1.logprobs import token_logprobs

    with FakeTensorMode(), HostSyncs():
        model = fake_model(c, "cpu", torch.bfloat16).train()  # (FLOPs are FLOPs)
        ids = torch.randint(0, c.vocab_size, (1, tokens + 1))
        with flop_counter() as fc:
            h = model(ids[:, :-1], mtp=False).hidden
            logp, _ = token_logprobs(h, model.lm_head.weight, ids[:, 1:])
            (-logp.mean()).backward()
    return float(fc.get_total_flops())


# ---------------------------------------------------------------------------------------------- memory
@dataclass
class Simulation:
    """Rank 0's peak during the update micro-batch and optimizer step, by kind (bytes), and the step's FLOPs."""
    spec: PlanSpec
    peak: dict[str, float]  # the tracker's kinds at the peak
    flops: float  # the micro-batch's forward + backward
    tokens: int
    seconds: float
    syncs: list[str] = field(default_factory=list)

    def _sum(self, *kinds: str) -> float:
        return sum(self.peak.get(k, 0.0) for k in kinds)

    def components(self) -> list[tuple[str, float]]:
        # MemTracker's kinds (one rank) and FSDPMemTracker's (sharded), in the plan's groups
        return [("parameters (sharded + gathered copies)",
                 self._sum("Parameter", "Sharded Param", "Unsharded Param", "All Gather")),
                ("gradients (sharded + unsharded)",
                 self._sum("Gradient", "Sharded Grad", "Unsharded Grad", "Reduce Scatter")),
                ("optimizer state", self._sum("Optstate", "OptState")),
                ("activations and temporaries", self._sum("Activation", "Temp", "Inputs")),
                ("buffers and other", self._sum("Buffer", "Other"))]

    @property
    def total(self) -> float:
        return self.peak["Total"]

    def table(self, plan: MemoryPlan) -> str:
        """Simulated against planned, GiB per GPU, in the same groups."""
        p = plan
        planned = [p.parameters + p.gathered_weights + p.fp8_weights, p.gradients + p.grad_reduce, p.optimizer,
                   p.activations, 0.0]
        lines = [f"  {'component':<44}{'simulated':>10}{'plan':>10}"]
        lines += [f"  {name:<44}{v / GIB:>10.2f}{q / GIB:>10.2f}"
                  for (name, v), q in zip(self.components(), planned, strict=True)]
        lines.append(f"  {'total':<44}{self.total / GIB:>10.2f}{p.total / GIB:>10.2f}")
        return "\n".join(lines)


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[Any]:
    """A fake process group of `world` ranks (this process is rank 0) and its 1-D CPU device mesh, made before any
    FakeTensorMode is entered (the mesh's rank table must be real); FSDP2 is handed that mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world,))
        # r1.parallel.Dist.wrap calls fully_shard without a mesh, which would make one inside the fake mode
        import torch.distributed.fsdp as fsdp

        with unittest.mock.patch.object(fsdp, "fully_shard", functools.partial(fsdp.fully_shard, mesh=mesh)):
            yield mesh
    finally:
        torch.distributed.destroy_process_group()


def _dist(world: int) -> Any:
    """A r1.parallel.Dist as `accelerate launch` with FSDP2 makes it on rank 0 of `world` CPU processes."""
    from r1.parallel import Dist

    d = Dist.__new__(Dist)  # its __init__ reads accelerate's launch environment, which a simulation has none of
    d.state, d.rank, d.world, d.device, d.main, d.fsdp = None, 0, world, torch.device("cpu"), True, world > 1
    d.expert_parallel, d.mesh = 1, None  # (expert parallelism is not simulated yet)
    return d


def _update_global_peak(tracker: Any, peak_state: Any = None) -> None:
    """The trackers' peak update after every op, for the whole process only: theirs also walks every module seen so
    far for per-module peaks (unused here), which made the step quadratic in the model's size (a 1B model: 60% of
    the simulation's time)."""
    for dev, snap in tracker._curr_mem_snap.items():
        if tracker._peak_mem.get(dev, 0) < snap["Total"]:
            tracker._peak_mem[dev] = snap["Total"]
            tracker._peak_mem_snap[dev] = dict(snap)


def tracked_update(model: nn.Module, c: V3Config, spec: PlanSpec, sharded: bool, prompt: int | None = None,
                   flops: bool = True) -> tuple[dict[str, float], float]:
    """One GRPO update micro-batch of spec.micro_batch_tokens tokens (one sequence: a prompt of `prompt` tokens,
    default T/8 up to 256, and its completion) and the optimizer step after it, on a model made ready by
    r1.runs.prepare_model, with the gradients of an earlier micro-batch and AdamW's state held throughout (as
    r1.plan assumes). Returns this rank's peak bytes by kind (FSDPMemTracker when sharded, else MemTracker) and the
    micro-batch's FLOPs. Real or fake tensors alike (tests/test_simulate.py runs it in two gloo processes)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    from r1.optim import OPTIMIZERS

    T = spec.micro_batch_tokens
    P = prompt if prompt is not None else min(256, max(1, T // 8))
    opt = OPTIMIZERS[spec.optim](model.parameters(), lr=1e-6, weight_decay=0.0, betas=(0.9, 0.99))
    hold_gradients_and_state(model, opt)
    batch = update_batch(c, 1, P, T - P, "cpu")
    tracker = FSDPMemTracker(model, opt) if sharded else MemTracker()
    if not sharded:
        tracker.track_external(model, opt)
    tracker._update_peak_stats = functools.partial(_update_global_peak, tracker)  # type: ignore[method-assign]
    # r1.compute.compute_context without the CPU's bf16 GEMM emulation: a GPU's GEMMs take bf16 natively
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=spec.precision != "fp32" and not sharded)
    counter = flop_counter() if flops else contextlib.nullcontext()  # (a dispatch layer more: off when not asked)
    with tracker, counter:
        with autocast:
            grpo_micro_batch(model, batch, spec.precision)
        optimizer_step(model, opt)
    peak = {getattr(k, "value", str(k)): float(v)
            for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    return peak, float(counter.get_total_flops()) if flops else float("nan")


def simulate(c: V3Config, spec: PlanSpec, fp8_block: int = 128, prompt: int | None = None,
             flops: bool = True) -> Simulation:
    """tracked_update on fake tensors, on rank 0 of spec.gpus fake ranks, the model prepared as `r1 train` prepares
    it (precision, gradient checkpointing, FSDP2 when gpus > 1)."""
    from r1.runs import prepare_model

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if spec.gpus > 1:
            stack.enter_context(fake_world(spec.gpus))
        stack.enter_context(FakeTensorMode())
        syncs = stack.enter_context(HostSyncs())
        dist = _dist(spec.gpus)
        model = prepare_model(V3ForCausalLM(c), dist, spec.precision, fp8_block, spec.gradient_checkpointing)
        stack.enter_context(even_expert_splits(model, syncs))
        peak, counted = tracked_update(model, c, spec, dist.fsdp, prompt, flops)
    return Simulation(spec, peak, counted, spec.micro_batch_tokens, time.perf_counter() - t0, list(syncs.sites))


def analytic_flops(c: V3Config, tokens: int) -> float:
    """`r1 model`'s training FLOPs for `tokens` tokens of one sequence."""
    return count_params(c, seq_len=tokens).train_flops_per_token * tokens
