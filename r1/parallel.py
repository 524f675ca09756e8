"""Processes, sharding and state dicts for `accelerate launch`: see Dist. Kept outside the model and the trainer
loop, as gpt-fast keeps parallelism outside its model."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor, nn


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which FSDP2's per-block all-gather
    and reduce-scatter buffers come from the heap and stay resident once freed (bench/shard_memory.py shows it);
    a fixed threshold returns them to the OS. CPU processes only."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


class Dist:
    """The processes `accelerate launch` started (gloo on CPU, nccl on GPU; one process is the plain case).

    Data parallel (default): every rank holds the whole model, rolls out its own prompts and runs the same number
    of micro-batches; gradients are averaged in one flat all-reduce per optimizer step (after all micro-batches, so
    accumulation costs no extra communication, and the output head may be used outside forward()).
    FSDP2 (an accelerate config with distributed_type FSDP): `wrap` shards every decoder block and the root with
    torch's fully_shard; gradients are reduce-scattered in backward. Checkpoints stay sharded (r1.checkpoint, DCP);
    `full_state` gathers whole state dicts where a full copy is wanted (rank checks, a reference reset).
    Expert parallelism (`expert_parallel` > 1, r1.expert_parallel): a (dp x ep) mesh; each MoE layer's routed experts
    split over ep, tokens sent to them by all-to-all; the rest under FSDP2 (turned on whatever the accelerate config
    says). A bad degree (not dividing the world) is one line here, before any model loads.
    """

    def __init__(self, expert_parallel: int = 1) -> None:
        from accelerate import PartialState

        # cpu=True lets accelerate pick gloo (MULTI_CPU) for torchrun-started processes on a machine without a GPU
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, self.state.device
        self.main = self.state.is_main_process
        from r1.expert_parallel import check_expert_parallel, expert_mesh

        check_expert_parallel(expert_parallel, world=self.world)
        self.expert_parallel = expert_parallel
        self.mesh = expert_mesh(self.world, expert_parallel, self.device.type) if expert_parallel > 1 else None
        self.fsdp = (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or self.mesh is not None) \
            and self.world > 1
        if self.fsdp and not torch.cuda.is_available():
            _fixed_mmap_threshold()

    def wrap(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        """FSDP2: shard each decoder block, then the root (embeddings, final norm, head, MTP); bf16 and fp8 compute
        with bf16 parameters, fp32 master weights and fp32 gradient reduction (r1.compute.mixed_precision_policy).
        With expert parallelism the routed experts are split over the ep mesh first and FSDP2 ignores them."""
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from r1.compute import COMPUTE_DTYPE, mixed_precision_policy

        ignored: set[nn.Parameter] = set()
        if self.mesh is not None:
            from r1.expert_parallel import apply_expert_parallel

            ignored = set(apply_expert_parallel(model, self.mesh, COMPUTE_DTYPE[precision]))
        mp = mixed_precision_policy(precision) or MixedPrecisionPolicy()  # fp32: FSDP2's default, all fp32
        inner = getattr(model, "model", model)  # transformers keeps the layers under .model
        for block in inner.layers:
            fully_shard(block, mp_policy=mp, ignored_params=ignored or None)
        fully_shard(model, mp_policy=mp, ignored_params=ignored or None)
        return model

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, {"sum": torch.distributed.ReduceOp.SUM,
                                             "max": torch.distributed.ReduceOp.MAX}[op])
        return t

    def average_grads(self, model: nn.Module) -> None:
        if self.mesh is not None:  # the routed experts' shards: summed over their dp replicas (FSDP2 did the rest)
            from r1.expert_parallel import reduce_expert_grads

            reduce_expert_grads(model, self.mesh, self.world)
        if self.world == 1 or self.fsdp:  # FSDP2 has reduce-scattered them in backward
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
        flat = torch.cat([g.flatten() for g in grads]) / self.world
        self.all_reduce(flat)
        for p, g in zip((p for p in model.parameters() if p.requires_grad), flat.split([g.numel() for g in grads]),
                        strict=True):
            p.grad = g.view_as(p)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """The gradients' global L2 norm (a tensor: no host sync), and every gradient scaled to at most max_norm, shard
        by shard (r1.optim.clip_grad_norm_; with expert parallelism r1.expert_parallel's, which sums two meshes)."""
        if self.mesh is None:
            from r1.optim import clip_grad_norm_

            return clip_grad_norm_(model.parameters(), max_norm)
        from r1.expert_parallel import clip_grad_norm_ as clip_two_meshes

        return clip_two_meshes(model, max_norm, self.mesh)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return metrics
        keys = sorted(metrics)
        t = self.all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device))
        return {k: v / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a collective)."""
        return bool(self.all_reduce(torch.tensor(int(flag), device=self.device), "max").item())

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def full_state(self, model: nn.Module, everywhere: bool = False) -> dict[str, Any]:
        """The unsharded model state dict; a collective under FSDP. On rank 0 only, in CPU memory, unless
        `everywhere`."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        o = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere and self.world > 1)
        return get_model_state_dict(model, options=o)

    def load_full_state(self, model: nn.Module, msd: dict[str, Any]) -> None:
        """A full (unsharded) model state dict into `model`, sharded or not."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True))

    @staticmethod
    @torch.no_grad()
    def copy_weights(dst: nn.Module, src: nn.Module) -> None:
        """dst's parameters and buffers := src's, shard by shard (the two sharded alike, or neither)."""
        for a, b in zip(dst.state_dict().values(), src.state_dict().values(), strict=True):
            a.copy_(b)

    def same_parameters(self, model: nn.Module) -> bool:
        """True when every rank holds bit-identical parameters (max == min of a per-rank checksum); under FSDP the
        gathered full parameters are compared."""
        params = list(self.full_state(model, everywhere=True).values()) if self.fsdp else \
            [p.detach() for p in model.parameters()]
        s = torch.stack([p.double().sum() + (p.double() ** 2).sum() for p in params if p.is_floating_point()])
        s = s.to(self.device)
        lo, hi = s.clone(), s.clone()
        self.all_reduce(hi, "max")
        self.all_reduce(lo.neg_(), "max")
        return bool(torch.equal(hi, -lo))
