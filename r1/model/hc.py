"""Hyper-connections (HC, arXiv 2409.19606) and manifold-constrained HC (mHC, arXiv 2512.24880).

The residual stream is widened to n copies x_BTnD. Around a sub-block F (attention or MLP):
    x_next = H_res x + H_post^T F(H_pre x)
with H_pre [1 x n], H_post [n x 1], H_res [n x n], each = static bias + alpha * (RMSNorm(flatten(x)) phi).
mHC constrains H_pre = sigmoid(.), H_post = 2 sigmoid(.), H_res = Sinkhorn-Knopp(exp(.)) (doubly
stochastic), which bounds the gain of the composite H_res product across depth. HC applies tanh to
the dynamic part only (the paper's choice) and leaves the matrices unconstrained.

Init (HC paper): b_res = I, b_pre one-hot at (layer mod n), b_post = 1, phi = 0, alpha = 0.01. For mHC
the biases are set so that the constrained maps start at the same point: sigmoid(b_pre) = 1/n each
and 2 sigmoid(b_post) = 1.

When an hc/mhc model equals the standard one: with phi = 0 (so H does not depend on x), streams
expanded by copying and merged by their mean, if H_res has rows summing to 1 (identity for HC, any
doubly stochastic matrix for mHC), sum(H_pre) = 1 and H_post = 1, every stream stays equal to the
standard residual x, the sub-block reads x and each stream adds F(x): the function is the same.
HC's init satisfies it exactly; mHC's init satisfies it too (tests/test_hc.py checks both).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinkhorn(logits: Tensor, iters: int = 20) -> Tensor:
    """Doubly stochastic matrix from exp(logits) [..., n, n] by Sinkhorn-Knopp, in the log domain and
    fp32 so that large logits neither overflow nor leave an all-zero row; differentiable."""
    log_m = logits.float()
    for _ in range(iters):
        log_m = log_m - log_m.logsumexp(-1, keepdim=True)  # rows sum to 1
        log_m = log_m - log_m.logsumexp(-2, keepdim=True)  # columns sum to 1
    return log_m.exp()


def expand_streams(x_BTD: Tensor, n: int) -> Tensor:
    return x_BTD.unsqueeze(-2).expand(*x_BTD.shape[:-1], n, x_BTD.shape[-1]).contiguous()


def merge_streams(x_BTnD: Tensor) -> Tensor:
    return x_BTnD.mean(-2)


class HyperConnection(nn.Module):
    def __init__(self, c: object, index: int):
        super().__init__()
        self.n, self.mode, self.index = c.hc_streams, c.residual, index
        n, D = self.n, c.hidden_size
        self.norm_weight = nn.Parameter(torch.ones(n * D))
        self.eps = c.rms_norm_eps
        self.phi = nn.Parameter(torch.zeros(n * D, n + n + n * n))  # -> pre (n), post (n), res (n*n)
        self.alpha = nn.Parameter(torch.full((3,), 0.01))
        self.b_pre = nn.Parameter(torch.zeros(n))
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(torch.zeros(n, n))
        self.last_res: Tensor | None = None  # mean H_res of the last forward (for the gain metric)
        self.last_pre: Tensor | None = None
        self.last_post: Tensor | None = None
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
        n = self.n
        xf = x_BTnD.flatten(-2).float()
        xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        dyn = xn @ self.phi.float()
        d_pre, d_post, d_res = dyn.split([n, n, n * n], dim=-1)
        if self.mode == "hc":
            d_pre, d_post, d_res = d_pre.tanh(), d_post.tanh(), d_res.tanh()
        pre = self.b_pre + self.alpha[0] * d_pre
        post = self.b_post + self.alpha[1] * d_post
        res = self.b_res + self.alpha[2] * d_res.unflatten(-1, (n, n))
        if self.mode == "mhc":
            pre, post, res = pre.sigmoid(), 2 * post.sigmoid(), sinkhorn(res)
        return pre, post, res

    def forward(self, x_BTnD: Tensor, fn: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        pre_BTn, post_BTn, res_BTnn = self.weights(x_BTnD)
        if not torch.jit.is_scripting():
            with torch.no_grad():
                self.last_pre, self.last_post = pre_BTn.flatten(0, -2).mean(0), post_BTn.flatten(0, -2).mean(0)
                self.last_res = res_BTnn.flatten(0, -3).mean(0)
        dt = x_BTnD.dtype
        h_BTD = torch.einsum("...n,...nd->...d", pre_BTn.to(dt), x_BTnD)
        y_BTD, aux = fn(h_BTD)
        x_next = torch.einsum("...mn,...nd->...md", res_BTnn.to(dt), x_BTnD) \
            + post_BTn.to(dt).unsqueeze(-1) * y_BTD.unsqueeze(-2)
        return x_next, aux


@torch.no_grad()
def hc_metrics(model: nn.Module) -> dict[str, float]:
    """Composite gain over depth of the (token-averaged) H_res product of the last forward pass:
    forward gain = max absolute row sum, backward gain = max absolute column sum; and the spread
    (max - min over streams) of H_pre / H_post per layer, averaged."""
    hcs = [m for m in model.modules() if isinstance(m, HyperConnection) and m.last_res is not None]
    if not hcs:
        return {}
    prod = torch.eye(hcs[0].n)
    fwd = bwd = 1.0
    for m in hcs:
        prod = m.last_res.float() @ prod
        fwd = max(fwd, prod.abs().sum(-1).max().item())
        bwd = max(bwd, prod.abs().sum(-2).max().item())
    spread_pre = sum((m.last_pre.max() - m.last_pre.min()).item() for m in hcs) / len(hcs)
    spread_post = sum((m.last_post.max() - m.last_post.min()).item() for m in hcs) / len(hcs)
    return {"hc/forward_gain": fwd, "hc/backward_gain": bwd, "hc/pre_spread": spread_pre,
            "hc/post_spread": spread_post}
