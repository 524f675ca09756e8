"""Expert parallelism for the MoE layers, applied from outside the model (torchtitan's design, on torch.distributed).

The processes form a 2-D device mesh (dp x ep), dp = world / ep. Along `ep`, each rank holds n_routed_experts / ep
of every MoE layer's routed experts: their stacked parameters become DTensors sharded on dim 0 over the ep
sub-mesh (global shape and name unchanged, so DCP checkpoints reshard to any degree and the HF export gathers the
usual per-expert keys). The dense layers, attention, router and shared experts stay under FSDP2 over the whole
world (r1.parallel.Dist.wrap), which ignores the expert parameters: its MixedPrecisionPolicy does not reach them,
so the forward casts the local weights to the compute dtype itself. Along `dp` the expert shards are replicated;
their gradients are summed over dp (`reduce_expert_grads`), and the gradient norm adds both meshes' shards
(`clip_grad_norm_`).

The MoE layer's forward is the model's own: the router, the sort of (token, expert) pairs by expert and the
weighted sum. Only `moe.experts(x_sorted, counts_E)` changes (its class swapped for an ExpertParallel subclass):
1. dispatch: the counts per expert go to every rank of the ep group (one small all-to-all), then the sorted rows,
   which are already grouped by destination rank, by all_to_all_single (with autograd);
2. the received rows (grouped by source rank, then expert) are re-sorted by local expert and the original experts
   class (grouped GEMM, CPU, FP8 or checkpointed) computes them in one call on this rank's weights;
3. combine: the outputs go back by the reverse all-to-all, in the order they came.
The router's load counts (tokens_per_expert) are per global expert on every rank and all-reduced by
update_router_biases, so balancing stays global. Decode shortcuts that read every expert's weights
(r1.cpu.moe) are turned off for the swapped MoE layers: the sorted path is the one that dispatches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from r1.model.model import GroupedExperts, MoE


def check_expert_parallel(n: int, n_routed_experts: int | None = None, world: int | None = None) -> None:
    """One-line ValueError for an expert-parallel degree this run cannot use, before anything loads."""
    if n < 1:
        raise ValueError(f"expert_parallel must be >= 1, got {n}")
    if n == 1:
        return
    if n_routed_experts is not None and n_routed_experts % n:
        raise ValueError(f"expert_parallel={n} does not divide n_routed_experts={n_routed_experts}; "
                         f"choose a divisor of {n_routed_experts}")
    if world is not None and n > world:
        raise ValueError(f"expert_parallel={n} is larger than the {world} process(es) launched "
                         f"(accelerate launch --num_processes)")
    if world is not None and world % n:
        raise ValueError(f"expert_parallel={n} does not divide the {world} processes launched")


def expert_mesh(world: int, n: int, device_type: str) -> Any:
    """The (dp, ep) DeviceMesh of `world` ranks: rank = dp_index * n + ep_index (an ep group is n adjacent ranks)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // n, n), mesh_dim_names=("dp", "ep"))


# ---------------------------------------------------------------------------------------------- dispatch
class ExpertParallel(GroupedExperts):
    """The routed experts of one MoE layer spread over an ep group; mixed into the experts' own class by
    `apply_expert_parallel` (parameters unchanged in name and global shape, now DTensors sharded on dim 0)."""

    ep_group: Any  # the ep ProcessGroup
    compute_dtype: torch.dtype | None  # FSDP2's param_dtype for the dense part (bf16 / fp8); None = as stored
    local_experts: nn.Module  # the original experts class on this rank's shards (not a registered submodule)

    def forward(self, x_NsD: Tensor, counts_E: Tensor) -> Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        n = dist.get_world_size(self.ep_group)
        E = counts_E.shape[0]
        local_E = E // n
        # how many rows each rank sends this one, per local expert: [source rank, local expert]
        recv_RL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_RL, counts_E.contiguous(), group=self.ep_group)
        recv_RL = recv_RL.view(n, local_E)
        send = counts_E.view(n, local_E).sum(1).tolist()
        recv = recv_RL.sum(1).tolist()
        x_RsD = all_to_all_single_autograd(x_NsD.contiguous(), recv, send, self.ep_group)
        # received rows are grouped by source rank, then expert: a stable sort by local expert keeps each expert's
        # rows in source-rank order, so every expert sees one contiguous slice
        expert_of_row = torch.arange(local_E, device=x_NsD.device).repeat(n).repeat_interleave(
            recv_RL.flatten(), output_size=x_RsD.shape[0])
        order = expert_of_row.argsort(stable=True)
        y_sorted = self._local(x_RsD.index_select(0, order), recv_RL.sum(0))
        y_RsD = y_sorted.index_select(0, order.argsort())
        return all_to_all_single_autograd(y_RsD.contiguous(), send, recv, self.ep_group)

    def _local(self, x_NsD: Tensor, counts_L: Tensor) -> Tensor:
        """The original experts' forward on this rank's shards (plain tensors, in the compute dtype)."""
        inner = self.__dict__["local_experts"]
        inner.training = self.training
        inner._parameters = {k: self._compute_weight(p) for k, p in self._parameters.items()}
        return inner(x_NsD, counts_L)

    def _compute_weight(self, p: Tensor) -> Tensor:
        w = p.to_local()  # differentiable: the gradient lands on the DTensor parameter's local shard
        return w.to(self.compute_dtype) if self.compute_dtype is not None and w.is_floating_point() else w


def _ep_class(cls: type[nn.Module]) -> type[nn.Module]:
    if issubclass(cls, ExpertParallel):
        return cls
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
    return _EP_CLASSES[cls]


def _ep_moe_class(cls: type[nn.Module]) -> type[nn.Module]:
    """cls whose experts_sum is always the model's sorted path (decode shortcuts read every expert's weights)."""
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (cls,), {"experts_sum": MoE.experts_sum})
    return _EP_CLASSES[cls]


_EP_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def apply_expert_parallel(model: nn.Module, mesh: Any, compute_dtype: torch.dtype | None = None) -> list[nn.Parameter]:
    """In place: every MoE layer's routed experts split over mesh["ep"] (this rank keeps rows
    [ep_index * E/n, (ep_index + 1) * E/n) of each stacked parameter, on meta too: no communication). Apply after
    the precision and checkpointing swaps, before FSDP2 (which must ignore the returned parameters)."""
    from torch.distributed.tensor import DTensor, Shard

    ep_mesh = mesh["ep"]
    n, idx = ep_mesh.size(), ep_mesh.get_local_rank()
    params: list[nn.Parameter] = []
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        ex = moe.experts
        if isinstance(ex, ExpertParallel):
            continue
        inner = object.__new__(type(ex))
        inner.__dict__.update(ex.__dict__, _parameters={}, _modules={}, _forward_hooks={}, _forward_pre_hooks={})
        for name, p in list(ex._parameters.items()):
            rows = p.shape[0] // n
            local = p.detach()[idx * rows:(idx + 1) * rows].clone()
            dp = nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False,
                                                 shape=p.shape, stride=p.stride()), requires_grad=p.requires_grad)
            ex._parameters[name] = dp
            params.append(dp)
        ex.__class__ = _ep_class(type(ex))
        ex.__dict__["local_experts"] = inner
        ex.ep_group, ex.compute_dtype = ep_mesh.get_group(), compute_dtype
        moe.__class__ = _ep_moe_class(type(moe))
    return params


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters(recurse=False)]


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, mesh: Any, divide: float) -> None:
    """The routed experts' gradients summed over the dp dimension (the replicas of a shard) and divided by `divide`
    (the world size: FSDP2 averages the dense part's gradients over the world, and each shard's gradient already sums
    its ep group's tokens)."""
    dp = mesh["dp"]
    grads = [p.grad.to_local() for p in expert_parameters(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    if dp.size() > 1:
        dist.all_reduce(flat, group=dp.get_group())
    flat /= divide
    for g, f in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(f.view_as(g))


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh: Any) -> Tensor:
    """torch's clip_grad_norm_ (L2, foreach) over a model whose dense gradients are FSDP2 shards of the world mesh and
    whose expert gradients are shards of the ep sub-mesh (DTensors on two meshes, which torch's cannot mix): each
    rank's squares summed, all-reduced over the world, the experts' divided by their dp replicas."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    local = [(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad, id(p) in experts) for p in params]
    sq = torch.zeros(2, dtype=torch.float32, device=params[0].grad.device if params else "cpu")
    for g, is_expert in local:
        sq[int(is_expert)] += g.float().pow(2).sum()
    dist.all_reduce(sq)
    total = (sq[0] + sq[1] / mesh["dp"].size()).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g, _ in local:
        g.mul_(coef.to(g.dtype))
    return total


def all_to_all_bytes_per_token(hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """What dispatch sends per token per MoE layer (combine returns as much): K rows of the hidden width."""
    return top_k * hidden * torch.empty((), dtype=dtype).element_size()

