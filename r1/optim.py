"""The optimizers a recipe names (`optim`, as transformers' TrainingArguments.optim), and AdamW with low-precision
moments (DeepSeek-V3 keeps AdamW's first and second moments in BF16).

Per step, in fp32: m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * p   (decoupled decay).
Only the stored m, v are `moment_dtype`. Why stochastic rounding: bf16 keeps 8 significant bits, so
v * b2 with b2 = 0.999 is within half an ulp of v and round-to-nearest writes v back unchanged: v would
never decay after a gradient spike. Rounding up or down at random, with probability given by the distance,
keeps E[stored] equal to the fp32 value, so the decay survives on average. The rounding noise is drawn from a
generator seeded by (seed, step, parameter index), so the optimizer's state dict is all there is to resume it bit
for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


def round_stochastic(x: Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """fp32 -> bf16 rounding up or down with probability proportional to the distance (unbiased).
    Adds uniform noise below bf16's last kept bit of the fp32 pattern, then truncates those 16 bits."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low 16 bits are zero


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with m and v stored in `moment_dtype` (bf16 halves the optimizer state:
    4 bytes per parameter instead of 8). With moment_dtype=float32 it matches torch.optim.AdamW."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 moment_dtype: torch.dtype = torch.bfloat16, stochastic_rounding: bool = True, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moment_dtype, self.stochastic_rounding, self.seed = moment_dtype, stochastic_rounding, seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator | None:
        """Own generator (the optimizer must not shift the model's random streams), a function of the step."""
        if not self.stochastic_rounding:
            return None
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device)
        return gen.manual_seed(hash((self.seed, step, index)) & ((1 << 63) - 1))  # reseeded: one per device

    def _store(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        return x.to(self.moment_dtype) if gen is None else round_stochastic(x, self.moment_dtype, gen)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to the parameter's dtype; the moments go back to `moment_dtype`
        (exact: they were saved in it)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].to(self.moment_dtype)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                st["step"] += 1
                t, g = st["step"], p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                gen = self._generator(p.device, t, index)
                st["exp_avg"].copy_(self._store(m, gen))
                st["exp_avg_sq"].copy_(self._store(v, gen))
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                p.mul_(1 - lr * wd)
                p.add_((m / (1 - b1**t) / denom).to(p.dtype), alpha=-lr)
        return loss


def _adamw_torch_fused(params: Iterable[Tensor], lr: float, weight_decay: float,
                       betas: tuple[float, float]) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters (on CPU 0.5 ms a step for the smoke model, against 2.4 ms for the loop)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)


def _adamw_bf16(params: Iterable[Tensor], lr: float, weight_decay: float,
                betas: tuple[float, float]) -> torch.optim.Optimizer:
    return AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


# recipe `optim` -> optimizer(params, lr=, weight_decay=, betas=)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw_torch_fused": _adamw_torch_fused,  # torch's AdamW, fp32 moments
    "adamw_bf16": _adamw_bf16,  # bf16 moments with stochastic rounding: 4 bytes of state per parameter, not 8
}


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm) computed on each rank's own shards when FSDP2 holds the gradients as
    DTensors: the squared norms of the local shards all-reduced once, the scale applied to the shards in place.
    Why: torch's own clip on DTensor gradients gathers every gradient whole (twice its sharded size at once over 2
    ranks, 256x over 256: `r1 model --simulate` shows it). Returns the total norm (a tensor: no host sync)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if not local:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(local, 2.0)
    if any(isinstance(g, DTensor) for g in grads):  # each element lives on one rank: sum the squares
        sq = norm.square()
        torch.distributed.all_reduce(sq)
        norm = sq.sqrt()
    torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm
