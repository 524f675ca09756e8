"""Token log-probs and LM losses from hidden states, in chunks.

The full [tokens x vocab] logits never sit in memory at once: each chunk of rows is projected,
reduced to what is needed (the target's log-prob, the entropy) and dropped; with several chunks
backward recomputes each chunk's logits instead of keeping them (a single chunk is kept; see _HeadLogprobs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from r1.grpo import masked_mean


# The output head's GEMMs, a b^T and dy^T x; r1.cpu.accelerate replaces both with oneDNN's (r1/cpu/gemm.py), which
# fall back to these for anything but fp32 CPU tensors.
def mm_nt(a_MK: Tensor, b_NK: Tensor) -> Tensor:
    return a_MK @ b_NK.T


def wgrad(dy_MN: Tensor, x_MK: Tensor) -> Tensor:
    return dy_MN.T @ x_MK


def _compute_dtype(h: Tensor, w: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (as a plain h @ w.T would get), else the inputs' common one."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.promote_types(h.dtype, w.dtype)


class _HeadLogprobs(torch.autograd.Function):
    """Fused output head + log-softmax + gather (+ entropy), by chunks of rows, z = h W^T / temperature:

        logp_n = log p_n[t_n],  log p_n = log_softmax(z_n),  H_n = -sum_v p_nv log p_nv
        dlogp_n/dz_n = onehot(t_n) - p_n,   dH_n/dz_n = -p_n * (log p_n + H_n)
        dz = g_logp (onehot - p) + g_H dH/dz,  dh = dz W / temperature,  dW = dz^T h / temperature

    Why not autograd over `cross_entropy`: its backward allocates and fills a zero [rows x vocab] tensor, then
    another for log_softmax's gradient; here the gradient is built in place in the log-softmax buffer
    (exp, scale, scatter). One chunk (rows <= chunk) keeps its log-softmax for backward; with more chunks each
    one's is recomputed there, so [tokens x vocab] fp32 never sits in memory at once. The kept buffer is
    consumed by backward (a second backward through the same graph raises autograd's in-place error)."""

    @staticmethod
    def forward(ctx: Any, h_ND: Tensor, w_VD: Tensor, t_N: Tensor, temperature: float, with_entropy: bool,
                chunk: int) -> tuple[Tensor, Tensor]:
        N, cdt = h_ND.shape[0], _compute_dtype(h_ND, w_VD)
        logp_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
        ent_N = torch.zeros(N, dtype=torch.float32, device=h_ND.device)
        lsm = None
        for s in range(0, N, chunk):
            lsm = _log_softmax(h_ND[s:s + chunk], w_VD, temperature, cdt)
            logp_N[s:s + chunk] = lsm.gather(1, t_N[s:s + chunk, None]).squeeze(1)
            if with_entropy:
                ent_N[s:s + chunk] = -(lsm.exp() * lsm).sum(-1)
        ctx.set_materialize_grads(False)  # an unused output (the entropy, usually) gets None, not zeros
        ctx.keep = N <= chunk
        ctx.save_for_backward(h_ND, w_VD, t_N, ent_N, lsm if ctx.keep else None)
        ctx.temperature, ctx.chunk, ctx.cdt, ctx.with_entropy = temperature, chunk, cdt, with_entropy
        return logp_N, ent_N

    @staticmethod
    def backward(ctx: Any, g_logp: Tensor | None, g_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        h_ND, w_VD, t_N, ent_N, kept = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        T, cdt = ctx.temperature, ctx.cdt
        g_logp = torch.zeros_like(ent_N) if g_logp is None else g_logp.float()
        wc = w_VD.to(cdt)
        with_entropy_grad = g_ent is not None and ctx.with_entropy  # without it the entropy output is constant 0
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if need_w else None
        for s in range(0, h_ND.shape[0], ctx.chunk):
            e = s + ctx.chunk
            lsm = kept if ctx.keep else _log_softmax(h_ND[s:e], w_VD, T, cdt)
            if with_entropy_grad:  # dz = p * (-g_logp - g_H (log p + H))
                coef = (lsm + ent_N[s:e, None]).mul_(-g_ent[s:e, None].float()).sub_(g_logp[s:e, None])
                dz = lsm.exp_().mul_(coef)
            else:
                dz = lsm.exp_().mul_(-g_logp[s:e, None])
            dz.scatter_add_(1, t_N[s:e, None], g_logp[s:e, None])  # + g_logp onehot(t)
            if T != 1.0:
                dz.div_(T)
            dzc = dz.to(cdt)
            if need_h:
                grad_h[s:e] = mm_nt(dzc, wc.T)
            if need_w:
                grad_w += wgrad(dzc, h_ND[s:e].to(cdt)).float()
        return grad_h, None if grad_w is None else grad_w.to(w_VD.dtype), None, None, None, None


def _log_softmax(h_nD: Tensor, w_VD: Tensor, temperature: float, cdt: torch.dtype) -> Tensor:
    with torch.autocast(h_nD.device.type, enabled=False):
        z = mm_nt(h_nD.to(cdt), w_VD.to(cdt)).float()
    if temperature != 1.0:
        z.div_(temperature)
    # in place on the CPU (the kernel finishes reading a row before writing it): a second fresh [rows x vocab]
    # buffer costs ~5x the log-softmax itself in page faults
    return torch._log_softmax(z, -1, False, out=z) if z.device.type == "cpu" else torch.log_softmax(z, -1)


def token_logprobs(hidden_BTD: Tensor, weight_VD: Tensor, targets_BT: Tensor, temperature: float = 1.0,
                   chunk: int = 4096, with_entropy: bool = False) -> tuple[Tensor, Tensor]:
    """log softmax(h W^T / temperature)[target] per position, and the entropy of that distribution
    (zeros unless with_entropy). Shapes [B, T]; fp32. Differentiable in h and W (see _HeadLogprobs)."""
    B, T, D = hidden_BTD.shape
    logp, ent = _HeadLogprobs.apply(hidden_BTD.reshape(-1, D), weight_VD, targets_BT.reshape(-1), temperature,
                                    with_entropy, chunk)
    return logp.view(B, T), ent.view(B, T)


def lm_loss(out: object, lm_head_weight: Tensor, input_ids: Tensor, loss_mask: Tensor | None = None,
            mtp_weight: float = 0.3, chunk: int = 4096) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy on positions where loss_mask[t+1] (the predicted token) is set, plus
    mtp_weight x the mean over MTP depths k of the CE for token t+k+1, plus the MoE balance loss.
    `out` is a V3Output (or anything with .hidden, .mtp_hidden, .aux_loss)."""
    mask = torch.ones_like(input_ids, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    logp, _ = token_logprobs(out.hidden[:, :-1], lm_head_weight, input_ids[:, 1:], chunk=chunk)
    main = -masked_mean(logp, mask[:, 1:])
    total, metrics = main, {"loss/ce": main.item()}
    mtp_hidden = getattr(out, "mtp_hidden", [])
    if mtp_hidden:
        mtp_losses = []
        for k, hk in enumerate(mtp_hidden, start=1):  # hk [B, T-k, D] predicts token i+k+1
            lp, _ = token_logprobs(hk[:, :-1], lm_head_weight, input_ids[:, k + 1:], chunk=chunk)
            mtp_losses.append(-masked_mean(lp, mask[:, k + 1:]))
        mtp = torch.stack(mtp_losses).mean()
        total = total + mtp_weight * mtp
        metrics["loss/mtp"] = mtp.item()
    aux = getattr(out, "aux_loss", None)
    if aux is not None and aux.requires_grad:
        total = total + aux
        metrics["loss/balance"] = aux.item()
    return total, metrics
