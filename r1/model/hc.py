"""Hyper-connections (HC, arXiv 2409.19606) and manifold-constrained HC (mHC, arXiv 2512.24880).

The residual stream is widened to n copies x_BTnD. Around a sub-block F (attention or MLP):
    x_next = H_res x + H_post^T F(H_pre x)
with H_pre [1 x n], H_post [n x 1], H_res [n x n] per token, each = static bias + alpha * dynamic part,
    dynamic = RMSNorm(flatten(x)) phi,   phi [n D, n + n + n^2] (one fused projection for all three)
HC applies tanh to the dynamic parts (the paper's choice) and leaves the maps unconstrained. mHC
constrains H_pre = sigmoid(.), H_post = 2 sigmoid(.), H_res = Sinkhorn-Knopp(exp(.)), a doubly
stochastic matrix: products of those are doubly stochastic too, so the composite gain over depth
stays at 1 (max row / column sum), where HC's can grow without bound.

Init (HC paper): b_res = I, b_pre one-hot at (layer mod n), b_post = 1, phi = 0, alpha = 0.01. For mHC
the biases are set so that the constrained maps meet the condition below: sigmoid(b_pre) = 1/n each,
2 sigmoid(b_post) = 1, and Sinkhorn(exp(I)) is doubly stochastic.

When an hc/mhc model computes the same function as the standard one (tests/test_hc.py):
the streams are expanded by copying and merged by their mean, and in every HyperConnection
    (a) H does not depend on x: phi = 0 (or alpha = 0), and
    (b) sum_i H_pre[i] = 1,  H_post[i] = 1 for all i,  sum_j H_res[i, j] = 1 for all i.
Then by induction every stream equals the standard residual x: the sub-block reads sum_i H_pre[i] x = x
and stream i becomes sum_j H_res[i, j] x + F(x) = x + F(x); the mean of n equal streams is x. Both inits
satisfy (a) and (b) exactly (mHC up to fp32 rounding of the Sinkhorn sums). For generic block weights
(b) is also necessary for the streams to stay equal copies (an mHC H_res always meets it), and any
x-dependence (phi != 0 with alpha != 0) breaks the equality. One near-exception: a sub-block that starts
with RMSNorm sees c x like x for c = sum H_pre > 0, but for the eps in its norm.
At init phi = 0, so the loss has gradients in phi and the biases but none in alpha or the norm weight
(they act through phi x only) until phi has moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from r1.model import cext
from r1.model.gemm import mm_nt, usable, wgrad


class _Sinkhorn(torch.autograd.Function):
    """Forward: the iterations of `sinkhorn` in place, without a graph. Backward: the implicit-function
    gradient of the exact projection, taken at the computed P (Eisenberger et al. 2022, "A unified
    framework for implicit Sinkhorn differentiation"). With P = diag(a) exp(M) diag(b) doubly stochastic
    and G = dL/dP, perturbing M and the scalings under the two sum constraints gives
        dL/dM = P * (G - alpha 1^T - 1 beta^T),   [I  P; P^T  I] [alpha; beta] = [(P*G) 1; (P*G)^T 1]
    Eliminating alpha = r - P beta (r, c = row, column sums of P*G):
        (I - P^T P + 1 1^T) beta = c - P^T r,
    an n x n solve per token. The 1 1^T term fixes the system's null direction (alpha + t, beta - t); a
    ridge of 10 eps (1e-6 in fp32) keeps it solvable where P is nearly a permutation (I - P^T P ~ 0, and
    then dL/dM ~ 0 whatever beta is). dL/dM has zero row and column sums, as P ignores adding constants
    along either.
    Why: unrolling 20 iterations in autograd costs ~200 small ops in the backward (8 per iteration, plus
    the log-domain step and the rounding), ~40% of mHC's time on CPU; this is ~15 ops. Where the 20
    iterations have converged the two gradients agree (tests/test_hc.py); where they have not, this is
    the gradient of the projection the iterations approximate, not of the rounding's kinks."""

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


SINKHORN_ITERS = 20  # mHC's H_res: the torch path (sinkhorn) and the C one (_Maps) alike


def sinkhorn(logits: Tensor, iters: int = SINKHORN_ITERS, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """The doubly stochastic matrix P = Sinkhorn-Knopp(exp(logits)) over the matrix dims (i, j) = dims;
    fp32 (fp64 stays fp64), differentiable (implicitly: _Sinkhorn). Rows (sum over j) and columns (sum
    over i) of P sum to 1 to fp32 rounding for any finite logits, P >= 0.

        K = exp(logits) scaled by one log-domain row + column normalisation
        repeat iters - 1:  K <- K / sum_j K,  K <- K / sum_i K
        round (Altschuler, Weed, Rigollet 2017, Alg. 2):
            X = K / max(sum_j K, 1),  Y = X / max(sum_i X, 1),  r = 1 - sum_j Y,  c = 1 - sum_i Y
            P = Y + r c^T / sum(r)

    Why the first iteration is in the log domain: afterwards every column holds an entry >= 1/n and
    every row one >= 1/n^2 for any logits, and the plain iterations keep all sums >= 1/n, so they never
    divide by zero and need no clamps (the plain ones are ~3x cheaper than logsumexp).
    Why the rounding: Sinkhorn converges only linearly, and 20 iterations leave the row sums off by
    ~3e-4 for N(0, 1) logits and by O(1) for large ones (50 randn: up to 2), which would let the gain
    of a product of many H_res grow. The rounding makes P exactly doubly stochastic (r, c >= 0 so
    P >= 0), moves K by at most 2 (|K 1 - 1|_1 + |K^T 1 - 1|_1), i.e. not at all once converged,
    and costs about one iteration.
    """
    i, j = dims
    return _Sinkhorn.apply(logits, iters, i % logits.dim(), j % logits.dim())


class _Maps(torch.autograd.Function):
    """Logits z [2n + n^2, N] (tokens last) -> (H_pre [N, n], H_post [N, n], H_res [N, n, n]) tokens first, in C
    (r1/model/hc_kernels.c: hc_maps, hc_maps_bwd): mHC's sigmoid, 2 sigmoid and Sinkhorn (`iters`, with the
    rounding and the implicit backward of _Sinkhorn), or HC's logits as they are (iters = 0). The same maps as the
    torch path in HyperConnection.weights to fp32 rounding (tests/test_hc.py). Why: the torch path is ~100
    dispatches on [n, n, N] tensors a sub-block, forward + backward ~4 ms on the 2-core CPU; this is one pass."""

    @staticmethod
    def forward(ctx: object, z_MN: Tensor, n: int, iters: int) -> tuple[Tensor, Tensor, Tensor]:
        N = z_MN.shape[1]
        pre, post, res = z_MN.new_empty(N, n), z_MN.new_empty(N, n), z_MN.new_empty(N, n, n)
        cext.call("hc_maps", [z_MN, pre, post, res], N, n, iters)
        ctx.save_for_backward(pre, post, res)
        ctx.iters = iters
        return pre, post, res

    @staticmethod
    def backward(ctx: object, g_pre: Tensor | None, g_post: Tensor | None,
                 g_res: Tensor | None) -> tuple[Tensor, None, None]:
        pre, post, res = ctx.saved_tensors
        N, n = pre.shape
        g_pre, g_post, g_res = (torch.zeros_like(t) if g is None else g.contiguous()
                                for g, t in ((g_pre, pre), (g_post, post), (g_res, res)))
        dz = pre.new_empty(2 * n + n * n, N)
        cext.call("hc_maps_bwd", [pre, post, res, g_pre, g_post, g_res, dz], N, n, ctx.iters)
        return dz, None, None


class _Link:
    """The handoff between one HyperConnection call's two Functions in the backward, so that dx is written once.
    x feeds both: _NormProject (-> H) and _ReadAndMix (H_pre x, H_res x). _ReadAndMix's backward always runs
    first (H's gradient comes out of it), and on the C path it leaves dx to _NormProject: it stores what the
    mixing's terms need here and returns no dx; _NormProject's backward then forms the whole
        dx = g_p^T W^T  (its GEMM's output)  += H_res^T g_r + H_pre g_h - x (r^3 / X) sum_m (g p)
    in one C pass, instead of three more passes (the mixing's own dx buffer, the norm's term, autograd's sum)."""

    __slots__ = ("mix",)

    def __init__(self) -> None:
        self.mix: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (H_pre, H_res, g_h, g_r)


class _NormProject(torch.autograd.Function):
    """RMSNorm(x) W without the normalised copy of x, transposed (tokens last):
        dyn [m, N] = (x W)^T r,   r_t = rsqrt(mean(x_t^2) + eps),   x viewed as x_NX, X = W's rows
    and a backward that writes dx once and adds the norm's term in place:
        g_p = g r,   dx = g_p^T W^T - x (r^3 / X) sum_m (g p),   dW = x^T g_p^T
    (autograd through vector_norm, rsqrt and the product makes 3 more passes over the n-times-wide x_NX
    and a second dx to add). x comes in its own shape and dx goes back in it: the GEMM's output, viewed.
    With a _Link that holds the mixing's gradients, the mixing's dx terms go into the same buffer (C kernel);
    otherwise _ReadAndMix's dx (a plain tensor, computed first) is what autograd adds it into, in place."""

    @staticmethod
    def forward(ctx: object, x: Tensor, w_XM: Tensor, eps: float, link: _Link | None = None) -> Tensor:
        x_NX = x.reshape(-1, w_XM.shape[0])
        # vector_norm is one fused reduction; vecdot and x.pow(2).sum() write an [N, X] temporary
        r_N = torch.linalg.vector_norm(x_NX, dim=-1).square_().div_(x_NX.shape[-1]).add_(eps).rsqrt_()
        p_MN = mm_nt(w_XM.T, x_NX)  # W^T x^T: tokens last as returned, and ~2x x W on oneDNN (24 rows)
        ctx.save_for_backward(x, w_XM, r_N, p_MN)
        ctx.link = link
        return p_MN * r_N

    @staticmethod
    def backward(ctx: object, g_MN: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, w_XM, r_N, p_MN = ctx.saved_tensors
        x_NX = x.reshape(-1, w_XM.shape[0])
        gp_MN = g_MN * r_N
        coef_N = torch.linalg.vecdot(g_MN, p_MN, dim=0).mul_(r_N.pow(3)).div_(-x_NX.shape[-1])
        mix, dx = (ctx.link.mix if ctx.link is not None else None), None
        if ctx.needs_input_grad[0] or mix is not None:
            dx_NX = mm_nt(gp_MN.T, w_XM) if usable(gp_MN, w_XM) else torch.mm(gp_MN.T, w_XM.T)
            if mix is not None:  # the mixing's terms and the norm's, one pass (see _Link)
                ctx.link.mix = None
                N, n, D = x_NX.shape[0], mix[0].shape[-1], x.shape[-1]
                cext.call("hc_mix_bwd_into", [x, *mix, coef_N.contiguous(), dx_NX], N, n, D)
            else:  # the norm's term in place (addmm(x * coef, ...) would write x * coef and copy it)
                dx_NX.addcmul_(x_NX, coef_N.unsqueeze(-1))
            dx = dx_NX.view(x.shape)
        dw = wgrad(gp_MN.T, x_NX).T if ctx.needs_input_grad[1] else None  # oneDNN: ~2x MKL for this shape
        return dx, dw, None, None


class _ReadAndMix(torch.autograd.Function):
    """(x [N, n, D], H_pre [N, n], H_res [N, n, n]) -> (H_pre x [N, D], H_res x [N, n, D]), and a backward with
    the H_pre term in dx: the passes over the n-times-wider stream tensor are what HC costs on CPU. fp32 CPU
    tensors run the fused C kernels (r1/model/hc_kernels.c: one pass each way, several times torch's bmms of N
    tiny matrices), and with a _Link the backward leaves dx to _NormProject; anything else runs two bmms forward
    and four backward."""

    @staticmethod
    def forward(ctx: object, x_BTnD: Tensor, pre: Tensor, res: Tensor,
                link: _Link | None = None) -> tuple[Tensor, Tensor]:
        x = x_BTnD.reshape(-1, *x_BTnD.shape[-2:])  # inside: see _NormProject on views of gradients
        ctx.save_for_backward(x, pre, res)
        ctx.shape, ctx.link = x_BTnD.shape, link
        N, n, D = x.shape
        if cext.fits(n, x, pre, res):
            h, xr = x.new_empty(N, D), torch.empty_like(x)
            cext.call("hc_mix", [x, pre, res, h, xr], N, n, D)
            return h, xr
        return torch.bmm(pre.unsqueeze(-2), x).squeeze(-2), torch.bmm(res, x)

    @staticmethod
    def backward(ctx: object, g_h: Tensor | None, g_r: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor, None]:
        x, pre, res = ctx.saved_tensors
        N, n, D = x.shape
        g_h = x.new_zeros(N, D) if g_h is None else g_h.contiguous()
        g_r = torch.zeros_like(x) if g_r is None else g_r.contiguous()
        if cext.fits(n, x, pre, res, g_h, g_r):
            dpre, dres = pre.new_empty(N, n), res.new_empty(N, n, n)
            if ctx.link is not None and ctx.needs_input_grad[0]:
                cext.call("hc_mix_dots", [x, g_h, g_r, dpre, dres], N, n, D)
                ctx.link.mix = (pre, res, g_h, g_r)
                return None, dpre, dres, None
            dx = x.new_empty(ctx.shape)  # not a view of x's shape: see _NormProject
            cext.call("hc_mix_bwd", [x, pre, res, g_h, g_r, dx, dpre, dres], N, n, D)
            return dx, dpre, dres, None
        dx = x.new_empty(ctx.shape)
        g_h = g_h.unsqueeze(-2)  # [N, 1, D]
        torch.bmm(res.transpose(1, 2), g_r, out=dx.view(x.shape)).baddbmm_(pre.unsqueeze(-1), g_h)
        x_t = x.transpose(1, 2)
        return dx, torch.bmm(g_h, x_t).squeeze(-2), torch.bmm(g_r, x_t), None


class _WriteBack(torch.autograd.Function):
    """x_next = xr + H_post^T y (xr [N, n, D], H_post [N, n], y [N, D]), added into xr in place; the
    backward passes the gradient through to xr as it is (C kernels for fp32 CPU tensors, as _ReadAndMix)."""

    @staticmethod
    def forward(ctx: object, xr: Tensor, post: Tensor, y: Tensor) -> Tensor:
        ctx.mark_dirty(xr)
        ctx.save_for_backward(post, y)
        if cext.fits(xr.shape[1], xr, post, y):
            cext.call("hc_write", [xr, post, y], *xr.shape)
            return xr
        return xr.baddbmm_(post.unsqueeze(-1), y.unsqueeze(-2))

    @staticmethod
    def backward(ctx: object, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        post, y = ctx.saved_tensors
        if cext.fits(g.shape[1], post, y):
            g = g.contiguous()  # (an expanded gradient, from a sum, is not)
            dpost, dy = torch.empty_like(post), torch.empty_like(y)
            cext.call("hc_write_bwd", [g, post, y, dpost, dy], *g.shape)
            return g, dpost, dy
        # dH_post = y^T g^T as a row vector: bmm's matrix-vector form g y ran 8x slower ([1024, 4, 256]: 393 vs
        # 47 us); vecdot writes g * y, a fresh [N, n, D] temporary (81 us)
        return g, torch.bmm(y.unsqueeze(-2), g.transpose(1, 2)).squeeze(-2), \
            torch.bmm(post.unsqueeze(-2), g).squeeze(-2)


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
        # token means of the last forward's H (no grad), read by hc_metrics
        self.last_pre: Tensor | None = None
        self.last_post: Tensor | None = None
        self.last_res: Tensor | None = None
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

    def weights(self, x_BTnD: Tensor, link: _Link | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(H_pre [..., n], H_post [..., n], H_res [..., n, n]) in fp32 for x [..., n, D]."""
        n, lead = self.n, x_BTnD.shape[:-2]
        # RMSNorm(x) phi = rsqrt(mean(x^2) + eps) * (x (w * phi)): no normalised [N, n D] copy of x.
        # Computed transposed, tokens last ([2n + n^2, N]): the n-sums of Sinkhorn then add contiguous
        # N-vectors, ~3x faster than reducing rows of 4.
        dyn = _NormProject.apply(x_BTnD.float(), (self.norm_weight.unsqueeze(-1) * self.phi).float(), self.eps, link)
        if self.mode == "hc":
            dyn = dyn.tanh()
        if cext.fits(n, dyn):  # z = b + alpha dyn, then the maps in one C pass
            b = torch.cat([self.b_pre, self.b_post, self.b_res.flatten()]).float()
            # alpha per row of z (pre, post, res): views and one cat, no index tensor built per call
            a = torch.cat([self.alpha[:1].expand(n), self.alpha[1:2].expand(n), self.alpha[2:].expand(n * n)]).float()
            pre, post, res = _Maps.apply(torch.addcmul(b.unsqueeze(-1), a.unsqueeze(-1), dyn), n,
                                         SINKHORN_ITERS if self.mode == "mhc" else 0)
            return pre.view(*lead, n), post.view(*lead, n), res.view(*lead, n, n)
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
        # the backward's shared dx (_Link) where both Functions see this very tensor: fp32 (no .float() copy), and
        # contiguous (no reshape copy)
        link = _Link() if x_BTnD.dtype == torch.float32 and x_BTnD.is_contiguous() else None
        pre, post, res = self.weights(x_BTnD, link)
        with torch.no_grad():
            self.last_pre = pre.reshape(-1, self.n).mean(0)
            self.last_post = post.reshape(-1, self.n).mean(0)
            self.last_res = res.reshape(-1, self.n, self.n).mean(0)
        dt, shape = x_BTnD.dtype, x_BTnD.shape
        h, xr = _ReadAndMix.apply(x_BTnD, pre.to(dt).reshape(-1, self.n), res.to(dt).reshape(-1, self.n, self.n), link)
        y_BTD, aux = fn(h.view(*shape[:-2], shape[-1]))
        x_next = _WriteBack.apply(xr, post.to(dt).reshape(-1, self.n), y_BTD.reshape(-1, shape[-1]))
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
    hcs = [m for name, m in model.named_modules() if isinstance(m, HyperConnection) and m.last_res is not None]
    main = [m for name, m in model.named_modules()
            if isinstance(m, HyperConnection) and m.last_res is not None and not name.startswith("mtp.")]
    if not hcs:
        return {}
    prod = torch.eye(hcs[0].n, device=hcs[0].last_res.device)
    fwd, bwd = [prod.new_ones(())], [prod.new_ones(())]
    for m in main:
        prod = m.last_res.float() @ prod
        fwd.append(prod.abs().sum(-1).max())
        bwd.append(prod.abs().sum(-2).max())
    pre = torch.stack([m.last_pre.float() for m in hcs])
    post = torch.stack([m.last_post.float() for m in hcs])
    out = torch.stack([torch.stack(fwd).max(), torch.stack(bwd).max(), (pre.amax(-1) - pre.amin(-1)).mean(),
                       (post.amax(-1) - post.amin(-1)).mean()]).tolist()  # one device sync
    return dict(zip(("hc/forward_gain", "hc/backward_gain", "hc/pre_spread", "hc/post_spread"), out, strict=True))
