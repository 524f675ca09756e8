"""Token log-probs and LM losses from hidden states, in chunks.

The full [tokens x vocab] logits never sit in memory at once: each chunk of rows is projected,
reduced to what is needed (the target's log-prob, the entropy) and dropped; under autograd each
chunk is checkpointed, so backward recomputes its logits instead of keeping them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_stats(h_ND: Tensor, weight_VD: Tensor, targets_N: Tensor, temperature: float,
                 with_entropy: bool) -> tuple[Tensor, Tensor]:
    logits = (h_ND @ weight_VD.T).float()
    if temperature != 1.0:
        logits = logits / temperature
    # cross_entropy fuses log-softmax and the gather, and its backward is one pass (softmax - onehot)
    logp = -F.cross_entropy(logits, targets_N, reduction="none")
    if with_entropy:
        ent = logits.logsumexp(-1) - (logits.softmax(-1) * logits).sum(-1)
    else:
        ent = torch.zeros_like(logp)
    return logp, ent


def token_logprobs(hidden_BTD: Tensor, weight_VD: Tensor, targets_BT: Tensor, temperature: float = 1.0,
                   chunk: int = 4096, with_entropy: bool = False) -> tuple[Tensor, Tensor]:
    """log softmax(h W^T / temperature)[target] per position, and the entropy of that distribution
    (zeros unless with_entropy). Shapes [B, T]; fp32."""
    B, T, D = hidden_BTD.shape
    h_ND, t_N = hidden_BTD.reshape(-1, D), targets_BT.reshape(-1)
    logps, ents = [], []
    for s in range(0, h_ND.shape[0], chunk):
        args = (h_ND[s:s + chunk], weight_VD, t_N[s:s + chunk], temperature, with_entropy)
        # one chunk: keep its logits for backward rather than recompute them (no memory to save)
        if torch.is_grad_enabled() and (hidden_BTD.requires_grad or weight_VD.requires_grad) \
                and h_ND.shape[0] > chunk:
            lp, en = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            lp, en = _chunk_stats(*args)
        logps.append(lp)
        ents.append(en)
    return torch.cat(logps).view(B, T), torch.cat(ents).view(B, T)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


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


def full_logprobs(logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
    """Reference (unchunked) version, for tests."""
    return F.log_softmax(logits_BTV.float(), -1).gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
