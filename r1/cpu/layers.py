"""The CPU layer's versions of the model's small ops: RMSNorm, MLA's decode projections, SwiGLU.

Each is a subclass (or a function) that r1.cpu.accelerate swaps in for the reference in r1/model/model.py; each
computes the reference's function (tests/test_model.py holds them equal) in fewer CPU ops or passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r1.model.model import MLA, Cache, RMSNorm


class CPURMSNorm(RMSNorm):
    """fp32 CPU inputs: one fused norm (F.rms_norm with the weight), for decode-sized inputs 3 in-place ops, and for
    training a backward in 5 passes (_RMSNormCPU)."""

    # decode-sized CPU inputs (elements): torch's CPU rms_norm is a composite of ~10 dispatches, its scalar
    # operands each made a tensor; one fused norm, an addcmul and in-place ops take 5-7 us there instead of 8-10
    SMALL_CPU = 1 << 14

    def forward(self, x: Tensor) -> Tensor:
        # under autocast the reference: autocast would run _RMSNormCPU's backward vecdot in bf16
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.device.type != "cpu" \
                or torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormCPU.apply(x, self.weight, self.eps)
        if x.numel() <= self.SMALL_CPU:  # rsqrt(eps + |x|^2 / D): equal to 2e-7
            n = torch.linalg.vector_norm(x, 2, -1, keepdim=True)
            return (x * torch.addcmul(n.new_full((), self.eps), n, n, value=1.0 / x.shape[-1]).rsqrt_()).mul_(
                self.weight)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class _RMSNormCPU(torch.autograd.Function):
    """y = x r w, r = rsqrt(mean(x^2) + eps), with the backward in 5 passes (CPU torch has no fused RMSNorm
    backward; autograd's composite one takes ~20 ops, 1.5x the time):
        dx = r (g w) - x r^3 <g w, x> / D,    dw = sum_rows g x r"""

    @staticmethod
    def forward(ctx: object, x: Tensor, w: Tensor, eps: float) -> Tensor:
        y, r = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], w, eps)
        ctx.save_for_backward(x, w, r)
        return y

    @staticmethod
    def backward(ctx: object, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w, r = ctx.saved_tensors
        D, (need_x, need_w) = x.shape[-1], ctx.needs_input_grad[:2]
        dx = dw = None
        if need_x:
            gw = g * w
            coef = r.pow(3).mul_(torch.linalg.vecdot(gw, x).unsqueeze(-1)).div_(-D)
            dx = gw.mul_(r).addcmul_(x, coef)
        if need_w:
            dw = torch.linalg.vecdot((g * x).reshape(-1, D), r.reshape(-1, 1), dim=0)
        return dx, dw, None


class CPUMLA(MLA):
    """MLA whose decode steps (after a prefill) use W_kvb folded into the query and output projections (`_fold`,
    built once per generation by the cache), where that is cheaper."""

    def _folded(self, cache: Cache | None) -> tuple[Tensor, Tensor] | None:
        return cache.derived(self, self._fold) if cache is not None and cache.length else None

    def query(self, q_in: Tensor, cache: Cache | None) -> Tensor:
        fold = self._folded(cache)
        return super().query(q_in, cache) if fold is None else F.linear(q_in, fold[0])  # [q_lat, q_pe], scaled

    def _absorbed(self, q_first_BTHY: Tensor, q_pe_BTHR: Tensor, kv_BSX: Tensor, mask: Tensor,
                  cache: Cache) -> Tensor:
        fold = self._folded(cache)
        if fold is None:
            return super()._absorbed(q_first_BTHY, q_pe_BTHR, kv_BSX, mask, cache)
        B, T, H, L = q_first_BTHY.shape  # the query's first part is already q_lat
        o_lat_BTHL = self.latent_attention(q_first_BTHY.reshape(B * T, H, L), q_pe_BTHR, kv_BSX, mask, 1.0)
        return F.linear(o_lat_BTHL, fold[1], self.o_proj.bias)

    def _fold(self) -> tuple[Tensor, Tensor] | None:
        """W_kvb folded into the last query projection and o_proj, for decoding (one GEMM each instead of a
        GEMM plus a per-head bmm and its reshapes: small models are bound by the number of ops):
            W_q' = per head [scale W_uk^T W_q_nope ; scale W_q_pe]  [H (L + R), q_in],
            W_o' = [W_o,h W_uv,h for each head h]                   [D, H L].
        None where the products hold over twice the multiply-adds of the factors (the full V3: 3.4x), or a
        module is not an exact full-precision linear (FP8 rollouts keep training's numerics)."""
        c = self.c
        H, C, R, L, V = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
        q_last = self.q_proj if c.q_lora_rank is None else self.q_b_proj
        if not all(isinstance(m, nn.Linear) and getattr(m, "full_precision", True) and m.bias is None
                   for m in (q_last, self.kv_b_proj)) or not isinstance(self.o_proj, nn.Linear) \
                or not getattr(self.o_proj, "full_precision", True):
            return None
        Q, D = q_last.in_features, c.hidden_size
        if H * (L + R) * Q + D * H * L > 2 * (H * (C + R) * Q + H * C * L + H * V * L + D * H * V):
            return None
        w_HXL = self.kv_b_proj.weight.view(H, C + V, L).float()
        wq_HYQ = q_last.weight.view(H, C + R, Q).float()
        wq = torch.cat([w_HXL[:, :C].transpose(1, 2) @ wq_HYQ[:, :C], wq_HYQ[:, C:]], dim=1) * self.scale
        wo_HDL = self.o_proj.weight.view(D, H, V).float().transpose(0, 1) @ w_HXL[:, C:]
        dt = q_last.weight.dtype
        return wq.reshape(H * (L + R), Q).to(dt), wo_HDL.transpose(0, 1).reshape(D, H * L).to(dt)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up on the two halves of one [N, 2I] tensor. Backward keeps only the input and writes both
    halves' gradients into that input's own buffer (dead once backward has read it): no fresh [N, 2I] tensor
    (autograd's chunk backward would cat the halves; a new 2I-wide buffer per MoE layer costs page faults on
    CPU), silu(gate) recomputed. Forward and backward each write one fresh [N, I] tensor, the rest in place:
    on CPU a fresh 16 MiB tensor costs more in page faults than the arithmetic on it. A second backward
    through the same graph raises autograd's in-place error."""

    @staticmethod
    def forward(ctx: object, gu_NY: Tensor) -> Tensor:
        gate, up = gu_NY.chunk(2, dim=-1)
        ctx.save_for_backward(gu_NY)
        ctx.reuse = gu_NY.grad_fn is not None  # an intermediate (expert GEMM output), never a leaf's data
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: object, g_NI: Tensor) -> Tensor:
        (gu_NY,) = ctx.saved_tensors
        gate, up = gu_NY.chunk(2, dim=-1)
        I = gate.shape[-1]
        grad_NY = gu_NY if ctx.reuse else torch.empty_like(gu_NY)
        d_gate = g_NI * up  # then d/dgate = g * up * silu'(gate), in place
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        # d/dup = g * silu(gate), written over up (read above); then d/dgate over gate (read just now)
        torch.ops.aten.silu.out(gate, out=grad_NY[..., I:]).mul_(g_NI)
        grad_NY[..., :I].copy_(d_gate)
        return grad_NY


def swiglu(gu_NY: Tensor) -> Tensor:
    """r1.model.model.swiglu, with the in-place backward of _SwiGLU where a gradient is needed."""
    if torch.is_grad_enabled() and gu_NY.requires_grad:
        return _SwiGLU.apply(gu_NY)
    gate, up = gu_NY.chunk(2, dim=-1)
    return F.silu(gate) * up
