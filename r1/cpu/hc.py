"""The CPU layer's hyper-connections: the read and write sides of fp32 CPU streams in C (r1/cpu/hc_kernels.c).

r1.cpu.accelerate swaps HyperConnection for CPUHyperConnection (by class: same parameters). Where the kernels apply
(fp32 contiguous CPU tensors, at most cext.MAX_STREAMS streams, D a multiple of 8) the read side is one C pass
forward and two backward (_FusedRead) and the write-back forms H_res x + H_post^T y in one pass over x
(_FusedWriteBack); elsewhere the model's torch path runs. tests/test_hc.py holds the two equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from r1.cpu import cext
from r1.model.hc import SINKHORN_ITERS, HyperConnection


class _FusedRead(torch.autograd.Function):
    """The read side of a HyperConnection on fp32 CPU streams, in C (r1/cpu/hc_kernels.c): x [..., n, D] and the
    parameters as they are (RMSNorm weight nw [nD], phi [nD, M], b_pre, b_post, b_res, alpha; M = 2n + n^2) ->
        r = rsqrt(mean(x^2) + eps),  u = r x (nw phi),  z = b + a u  (HC: b + a tanh u),
        (H_pre, H_post, H_res) = maps(z),  h = H_pre x [N, D],
        xr: a buffer [N, n, D] where _FusedWriteBack forms H_res x + H_post^T y
    (b, a: the biases and alphas per row of z) returned as (h, xr, H_pre, H_post, H_res); H_pre goes on only as a
    metric, H_res to _FusedWriteBack and the metrics (no gradient: H_res x's gradient comes back through xr). The maps
    are mHC's (sigmoid, 2 sigmoid, Sinkhorn with `iters` iterations, the rounding and _Sinkhorn's implicit backward)
    or HC's (iters = 0), as the torch path computes them (tests/test_hc.py compares the two in fp64).
    Why: the torch path is ~10 kernels each way (the norm, three skinny GEMMs that MKL runs at a fifth of the CPU's
    peak, ~100 small ops for the maps, the batched mixing) plus the small ops that gather the parameters and split
    their gradients; the C path reads x once forward (hc_read_fwd) and twice backward (hc_read_bwd forms dx in one
    write and the biases' and alphas' gradients; hc_proj_wgrad forms those of phi and nw), and takes and returns
    the parameters as they are."""

    @staticmethod
    def forward(ctx: object, x_BTnD: Tensor, nw: Tensor, phi: Tensor, b_pre: Tensor, b_post: Tensor, b_res: Tensor,
                alpha: Tensor, eps: float, iters: int) -> tuple[Tensor, ...]:
        n, D = x_BTnD.shape[-2:]
        N, M = x_BTnD.numel() // (n * D), phi.shape[1]
        Mp = -(-M // 8) * 8  # the kernels' column tiles are 8 wide
        h = x_BTnD.new_empty(N, D)
        xr = x_BTnD.new_empty(N, n, D)  # unwritten: _FusedWriteBack forms H_res x + H_post^T y in it
        pre, post, res = x_BTnD.new_empty(N, n), x_BTnD.new_empty(N, n), x_BTnD.new_empty(N, n, n)
        u, r = x_BTnD.new_empty(N, Mp), x_BTnD.new_empty(N)
        cext.call("hc_read_fwd", [x_BTnD, nw, phi, b_pre, b_post, b_res, alpha, phi.new_empty(n * D, Mp), h, pre,
                                  post, res, u, r], eps, N, n, D, iters)
        ctx.save_for_backward(x_BTnD, nw, phi, alpha, r, u, pre, post, res)
        ctx.iters = iters
        ctx.mark_non_differentiable(pre, res)
        ctx.set_materialize_grads(False)
        return h, xr, pre, post, res

    @staticmethod
    def backward(ctx: object, g_h: Tensor | None, g_r: Tensor | None, _g_pre: None, g_post: Tensor | None,
                 _g_res: None) -> tuple[Tensor | None, ...]:
        x, nw, phi, alpha, r, u, pre, post, res = ctx.saved_tensors
        N, Mp = u.shape
        n, D = x.shape[-2:]
        g_h = x.new_zeros(N, D) if g_h is None else g_h.contiguous()
        g_r = x.new_zeros(N, n, D) if g_r is None else g_r.contiguous()
        g_post = x.new_zeros(N, n) if g_post is None else g_post.contiguous()
        dx, gp, db, dalpha = torch.empty_like(x), u.new_empty(N, Mp), u.new_empty(2 * n + n * n), u.new_empty(3)
        cext.call("hc_read_bwd", [x, nw, phi, alpha, u.new_empty(n * D * Mp), r, u, pre, post, res, g_h, g_r, g_post,
                                  dx, u.new_empty(N, Mp), u.new_empty(N, Mp), gp, db, dalpha], N, n, D, ctx.iters)
        dphi, dnw = torch.empty_like(phi), torch.empty_like(nw)
        cext.call("hc_proj_wgrad", [x, gp, nw, phi, u.new_empty(Mp, n * D), dphi, dnw], N, n, D)
        return dx, dnw, dphi, db[:n], db[n:2 * n], db[2 * n:].view(n, n), dalpha, None, None


class _FusedWriteBack(torch.autograd.Function):
    """x_next = H_res x + H_post^T y, formed in _FusedRead's unwritten buffer xr in one pass over x (hc_combine).
    The gradient reaches x and H_res through xr, as if the read had formed H_res x: _FusedRead's backward takes it
    as g_r, so x and H_res get none from this Function."""

    @staticmethod
    def forward(ctx: object, xr: Tensor, post: Tensor, y: Tensor, x: Tensor, res: Tensor) -> Tensor:
        ctx.mark_dirty(xr)
        ctx.save_for_backward(post, y)
        cext.call("hc_combine", [x, res, post, y, xr], *xr.shape)
        return xr

    @staticmethod
    def backward(ctx: object, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        post, y = ctx.saved_tensors
        g = g.contiguous()  # (an expanded gradient, from a sum, is not)
        dpost, dy = torch.empty_like(post), torch.empty_like(y)
        cext.call("hc_write_bwd", [g, post, y, dpost, dy], *g.shape)
        return g, dpost, dy, None, None


class CPUHyperConnection(HyperConnection):
    def forward(self, x_BTnD: Tensor, fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        n, dt, shape = self.n, x_BTnD.dtype, x_BTnD.shape
        params = (self.norm_weight, self.phi, self.b_pre, self.b_post, self.b_res, self.alpha)
        if not (cext.fits(n, x_BTnD, *params) and shape[-1] % 8 == 0):  # the kernels take D in whole vectors
            return super().forward(x_BTnD, fn)
        h, xr, pre, post, res = _FusedRead.apply(x_BTnD, *params, self.eps, SINKHORN_ITERS if self.mode == "mhc" else 0)
        self.last_h = (pre.detach(), post.detach(), res.detach())
        y_BTD, aux = fn(h.view(*shape[:-2], shape[-1]))
        x_next = _FusedWriteBack.apply(xr, post, y_BTD.reshape(-1, shape[-1]).to(dt).contiguous(), x_BTnD, res)
        return x_next.view(shape), aux
