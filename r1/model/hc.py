"""Hyper-connections (HC, arXiv 2409.19606) and manifold-constrained HC (mHC, arXiv 2512.24880).

The residual stream is widened to n copies x_BTnD. Around a sub-block F (attention or MLP):
    x_next = H_res x + H_post^T F(H_pre x)
with H_pre [1 x n], H_post [n x 1], H_res [n x n] per token, each = static bias + alpha * dynamic part,
    dynamic = RMSNorm(flatten(x)) phi,   phi [n D, n + n + n^2] (one fused projection for all three)
HC applies tanh to the dynamic parts and leaves the maps unconstrained. mHC constrains H_pre = sigmoid(.),
H_post = 2 sigmoid(.), H_res = Sinkhorn-Knopp(exp(.)), a doubly stochastic matrix: products of those are
doubly stochastic too, so the composite gain over depth stays at 1, where HC's can grow without bound.

Init (HC paper): b_res = I, b_pre one-hot at (layer mod n), b_post = 1, phi = 0, alpha = 0.01; for mHC the
biases make sigmoid(b_pre) = 1/n, 2 sigmoid(b_post) = 1. Either way H does not depend on x at init and
sum_i H_pre[i] = 1, H_post = 1, rows of H_res sum to 1, so (streams expanded by copying, merged by their mean)
every stream equals the standard residual and the model computes the standard one's function (tests/test_hc.py).
The CPU layer (r1/cpu/hc.py) runs the read and write sides of fp32 CPU streams in C.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Sinkhorn(torch.autograd.Function):
    """Forward: the iterations of `sinkhorn` in place, without a graph. Backward: the implicit-function gradient of
    the exact projection at the computed P (Eisenberger et al. 2022). With P = diag(a) exp(M) diag(b) doubly
    stochastic and G = dL/dP:
        dL/dM = P * (G - alpha 1^T - 1 beta^T),   (I - P^T P + 1 1^T) beta = c - P^T r,   alpha = r - P beta
    (r, c = row, column sums of P*G): an n x n solve per token. The 1 1^T term fixes the null direction
    (alpha + t, beta - t); a ridge of 10 eps keeps it solvable where P is nearly a permutation.
    Why: unrolling 20 iterations in autograd costs ~200 small ops in the backward; this is ~15. Where the
    iterations have converged the two gradients agree (tests/test_hc.py)."""

    @staticmethod
    def forward(ctx: object, logits: Tensor, iters: int, i: int, j: int) -> Tensor:
        m = logits.to(torch.promote_types(logits.dtype, torch.float32))
        # the log-domain row and column normalisation, exp(m - lse_j m - lse_i(.)), as two fused kernels
        k = torch.softmax(torch.log_softmax(m, j), i)
        for _ in range(iters - 1):
            k.div_(k.sum(j, keepdim=True))
            k.div_(k.sum(i, keepdim=True))
        x = k.div_(k.sum(j, keepdim=True).clamp_min(1.0))
        y = x.div_(x.sum(i, keepdim=True).clamp_min(1.0))
        r = (1 - y.sum(j, keepdim=True)).clamp_min(0.0)  # row deficits, a column vector
        c = (1 - y.sum(i, keepdim=True)).clamp_min(0.0)  # column deficits, a row vector
        p = y.add_(r * c / r.sum(i, keepdim=True).clamp_min(1e-12))
        ctx.save_for_backward(p)
        ctx.dims = (i, j)
        return p

    @staticmethod
    def backward(ctx: object, g: Tensor) -> tuple[Tensor, None, None, None]:
        (p,) = ctx.saved_tensors
        i, j = ctx.dims
        # tokens first, contiguous: batched matmul and solve on a token-strided batch loop per token
        P = p.movedim((i, j), (-2, -1)).contiguous()
        G = g.to(p.dtype).movedim((i, j), (-2, -1)).contiguous()
        PG = P * G
        r, c = PG.sum(-1), PG.sum(-2)
        a = torch.baddbmm(torch.ones_like(P).view(-1, *P.shape[-2:]), P.mT.reshape(-1, *P.shape[-2:]),
                          P.view(-1, *P.shape[-2:]), beta=1, alpha=-1).view(P.shape)
        a.diagonal(dim1=-2, dim2=-1).add_(1 + 10 * torch.finfo(a.dtype).eps)  # the ridge: 1e-6 in fp32
        beta = torch.linalg.solve(a, c - (P.mT @ r.unsqueeze(-1)).squeeze(-1))
        alpha = r - (P @ beta.unsqueeze(-1)).squeeze(-1)
        d = P * (G - alpha.unsqueeze(-1) - beta.unsqueeze(-2))
        return d.movedim((-2, -1), (i, j)).to(g.dtype), None, None, None


SINKHORN_ITERS = 20  # mHC's H_res (r1/cpu/hc.py's C kernels use the same)


def sinkhorn(logits: Tensor, iters: int = SINKHORN_ITERS, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """The doubly stochastic matrix P = Sinkhorn-Knopp(exp(logits)) over the matrix dims (i, j) = dims;
    fp32 (fp64 stays fp64), differentiable (implicitly: _Sinkhorn). Rows and columns of P sum to 1 to fp32
    rounding for any finite logits, P >= 0.

        K = exp(logits) scaled by one log-domain row + column normalisation
        repeat iters - 1:  K <- K / sum_j K,  K <- K / sum_i K
        round (Altschuler, Weed, Rigollet 2017, Alg. 2):
            X = K / max(sum_j K, 1),  Y = X / max(sum_i X, 1),  r = 1 - sum_j Y,  c = 1 - sum_i Y
            P = Y + r c^T / sum(r)

    Why the log-domain first step: afterwards every sum stays >= 1/n for any logits, so the plain iterations
    need no clamps. Why the rounding: 20 iterations leave row sums off by O(1) for large logits, which would let
    the gain of a product of many H_res grow; the rounding makes P exactly doubly stochastic.
    """
    i, j = dims
    return _Sinkhorn.apply(logits, iters, i % logits.dim(), j % logits.dim())


class _NormProject(torch.autograd.Function):
    """RMSNorm(x) W without the normalised copy of x, transposed (tokens last):
        dyn [m, N] = (x W)^T r,   r_t = rsqrt(mean(x_t^2) + eps),   x viewed as x_NX, X = W's rows
    and a backward that writes dx once and adds the norm's term in place:
        g_p = g r,   dx = g_p^T W^T - x (r^3 / X) sum_m (g p),   dW = x^T g_p^T
    (autograd through the norm and the product makes 3 more passes over the n-times-wide x_NX)."""

    @staticmethod
    def forward(ctx: object, x: Tensor, w_XM: Tensor, eps: float) -> Tensor:
        x_NX = x.reshape(-1, w_XM.shape[0])
        r_N = torch.linalg.vector_norm(x_NX, dim=-1).square_().div_(x_NX.shape[-1]).add_(eps).rsqrt_()
        p_MN = w_XM.T @ x_NX.T
        ctx.save_for_backward(x, w_XM, r_N, p_MN)
        return p_MN * r_N

    @staticmethod
    def backward(ctx: object, g_MN: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w_XM, r_N, p_MN = ctx.saved_tensors
        x_NX = x.reshape(-1, w_XM.shape[0])
        gp_MN = g_MN * r_N
        dx = None
        if ctx.needs_input_grad[0]:
            coef_N = torch.linalg.vecdot(g_MN, p_MN, dim=0).mul_(r_N.pow(3)).div_(-x_NX.shape[-1])
            dx = torch.mm(gp_MN.T, w_XM.T).addcmul_(x_NX, coef_N.unsqueeze(-1)).view(x.shape)
        dw = x_NX.T @ gp_MN.T if ctx.needs_input_grad[1] else None
        return dx, dw, None


class _ReadAndMix(torch.autograd.Function):
    """(x [N, n, D], H_pre [N, n], H_res [N, n, n]) -> (H_pre x [N, D], H_res x [N, n, D]) as batched matmuls, with a
    backward that forms dx in one buffer."""

    @staticmethod
    def forward(ctx: object, x_BTnD: Tensor, pre: Tensor, res: Tensor) -> tuple[Tensor, Tensor]:
        x = x_BTnD.reshape(-1, *x_BTnD.shape[-2:])
        ctx.save_for_backward(x, pre, res)
        ctx.shape = x_BTnD.shape
        return torch.bmm(pre.unsqueeze(-2), x).squeeze(-2), torch.bmm(res, x)

    @staticmethod
    def backward(ctx: object, g_h: Tensor | None, g_r: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        x, pre, res = ctx.saved_tensors
        g_h = x.new_zeros(x.shape[0], x.shape[-1]) if g_h is None else g_h
        g_r = torch.zeros_like(x) if g_r is None else g_r
        dx = x.new_empty(ctx.shape)
        g_h = g_h.unsqueeze(-2)  # [N, 1, D]
        torch.bmm(res.transpose(1, 2), g_r, out=dx.view(x.shape)).baddbmm_(pre.unsqueeze(-1), g_h)
        x_t = x.transpose(1, 2)
        return dx, torch.bmm(g_h, x_t).squeeze(-2), torch.bmm(g_r, x_t)


class _WriteBack(torch.autograd.Function):
    """x_next = xr + H_post^T y (xr [N, n, D], H_post [N, n], y [N, D]), written into xr in place; the backward passes
    the gradient through to xr as it is."""

    @staticmethod
    def forward(ctx: object, xr: Tensor, post: Tensor, y: Tensor) -> Tensor:
        ctx.mark_dirty(xr)
        ctx.save_for_backward(post, y)
        return xr.baddbmm_(post.unsqueeze(-1), y.unsqueeze(-2))

    @staticmethod
    def backward(ctx: object, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        post, y = ctx.saved_tensors
        # dH_post as a row vector y^T g^T: bmm's matrix-vector form g y runs ~8x slower
        dpost = torch.bmm(y.unsqueeze(-2), g.transpose(1, 2)).squeeze(-2)
        return g, dpost, torch.bmm(post.unsqueeze(-2), g).squeeze(-2)


def expand_streams(x_BTD: Tensor, n: int) -> Tensor:
    return x_BTD.unsqueeze(-2).expand(*x_BTD.shape[:-1], n, x_BTD.shape[-1]).contiguous()


def merge_streams(x_BTnD: Tensor) -> Tensor:
    return x_BTnD.mean(-2)


class HyperConnection(nn.Module):
    """H_pre, H_post, H_res around one sub-block; `index` (2 layer + 0 / 1) picks HC's one-hot b_pre."""

    def __init__(self, c: object, index: int):
        super().__init__()
        self.n, self.mode, self.index = c.hc_streams, c.residual, index
        n, D = self.n, c.hidden_size
        self.norm_weight = nn.Parameter(torch.ones(n * D))
        self.eps = c.rms_norm_eps
        self.phi = nn.Parameter(torch.zeros(n * D, n + n + n * n))  # -> pre (n), post (n), res (n*n)
        self.alpha = nn.Parameter(torch.full((3,), 0.01))  # pre, post, res
        self.b_pre = nn.Parameter(torch.zeros(n))
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(torch.zeros(n, n))
        # the last forward's H_pre, H_post, H_res (detached; their token means are taken only when hc_metrics asks)
        self.last_h: tuple[Tensor, Tensor, Tensor] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.n
        self.norm_weight.fill_(1.0)
        self.phi.zero_()
        self.alpha.fill_(0.01)
        self.b_res.copy_(torch.eye(n))
        if self.mode == "mhc":
            self.b_pre.fill_(-math.log(n - 1) if n > 1 else 10.0)  # sigmoid = 1/n
            self.b_post.zero_()  # 2 sigmoid(0) = 1
        else:
            self.b_pre.copy_(F.one_hot(torch.tensor(self.index % n), n).float())
            self.b_post.fill_(1.0)

    def weights(self, x_BTnD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(H_pre [..., n], H_post [..., n], H_res [..., n, n]) in fp32 for x [..., n, D], in torch ops."""
        n, lead = self.n, x_BTnD.shape[:-2]
        # RMSNorm(x) phi = rsqrt(mean(x^2) + eps) * (x (w * phi)): no normalised [N, n D] copy of x.
        # Computed transposed, tokens last ([2n + n^2, N]): the n-sums of Sinkhorn then add contiguous
        # N-vectors, ~3x faster than reducing rows of 4.
        dyn = _NormProject.apply(x_BTnD.float(), (self.norm_weight.unsqueeze(-1) * self.phi).float(), self.eps)
        if self.mode == "hc":
            dyn = dyn.tanh()
        pre = self.b_pre.unsqueeze(-1) + self.alpha[0] * dyn[:n]
        post = self.b_post.unsqueeze(-1) + self.alpha[1] * dyn[n:2 * n]
        res = self.b_res.unsqueeze(-1) + self.alpha[2] * dyn[2 * n:].view(n, n, -1)
        if self.mode == "mhc":
            pre, post, res = pre.sigmoid(), 2 * post.sigmoid(), sinkhorn(res, SINKHORN_ITERS, dims=(0, 1))
        # back to tokens first, contiguous: bmm on a token-strided batch falls back to a per-token loop
        pre, post, res = pre.T.contiguous(), post.T.contiguous(), res.permute(2, 0, 1).contiguous()
        return pre.view(*lead, n), post.view(*lead, n), res.view(*lead, n, n)

    def forward(self, x_BTnD: Tensor, fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """x_BTnD -> (H_res x + H_post^T fn(H_pre x), fn's aux output)."""
        n, dt, shape = self.n, x_BTnD.dtype, x_BTnD.shape
        # the streams and their mixing stay in the stream's dtype under autocast (bf16 compute): only fn is cast
        with torch.autocast(x_BTnD.device.type, enabled=False):
            pre, post, res = self.weights(x_BTnD)
            pre, res = pre.to(dt).reshape(-1, n), res.to(dt).reshape(-1, n, n)
            h, xr = _ReadAndMix.apply(x_BTnD, pre, res)
        self.last_h = (pre.detach(), post.detach(), res.detach())
        y_BTD, aux = fn(h.view(*shape[:-2], shape[-1]))
        with torch.autocast(x_BTnD.device.type, enabled=False):
            x_next = _WriteBack.apply(xr, post.to(dt).reshape(-1, n), y_BTD.reshape(-1, shape[-1]).to(dt))
        return x_next.view(shape), aux


@torch.no_grad()
def hc_metrics(model: nn.Module) -> dict[str, float]:
    """From the last forward pass, with R_l = the token mean of H_res in sub-block l (depth order):
        forward gain  = max_l max_i sum_j |(R_l ... R_1)[i, j]|   (max absolute row sum)
        backward gain = max_l max_j sum_i |(R_l ... R_1)[i, j]|   (max absolute column sum)
    over the main stack (not MTP); both 1 at identity and for any mHC (to fp32 rounding).
    pre_spread / post_spread: the mean over sub-blocks of (max - min) over streams of the token-mean
    H_pre / H_post."""
    # the composite product runs over the main stack only: an MTP block starts again from merged states
    hcs = [(name, m) for name, m in model.named_modules() if isinstance(m, HyperConnection) and m.last_h is not None]
    if not hcs:
        return {}
    n = hcs[0][1].n
    # token means of H_pre [.., n], H_post [.., n], H_res [.., n, n]
    means = [(name, *(t.reshape(-1, *t.shape[t.dim() - k:]).float().mean(0)
                      for t, k in zip(m.last_h, (1, 1, 2), strict=True))) for name, m in hcs]
    prod = torch.eye(n, device=means[0][3].device)
    fwd, bwd = [prod.new_ones(())], [prod.new_ones(())]
    for name, _, _, res in means:
        if name.startswith("mtp."):
            continue
        prod = res @ prod
        fwd.append(prod.abs().sum(-1).max())
        bwd.append(prod.abs().sum(-2).max())
    pre = torch.stack([m[1] for m in means])
    post = torch.stack([m[2] for m in means])
    out = torch.stack([torch.stack(fwd).max(), torch.stack(bwd).max(), (pre.amax(-1) - pre.amin(-1)).mean(),
                       (post.amax(-1) - post.amin(-1)).mean()]).tolist()  # one device sync
    return dict(zip(("hc/forward_gain", "hc/backward_gain", "hc/pre_spread", "hc/post_spread"), out, strict=True))
