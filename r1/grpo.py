"""GRPO maths as pure functions: tensors in, tensors out.

Shapes are in the names: B sequences (completions), T completion tokens (padded), G samples per prompt,
N prompts (groups), V vocabulary. Every variant is one entry of a small registry so a recipe picks it
by name (`ADVANTAGE_SCALES`, `RATIOS`, `AGGREGATIONS`) and the trainer never branches on strings.

References: DeepSeekMath (GRPO), DAPO (arXiv 2503.14476), Dr. GRPO (arXiv 2503.20783),
GSPO (arXiv 2507.18071), truncated importance sampling (Yao et al., "Your efficient RL framework
secretly brings you off-policy RL training", 2025).

Conventions where r1 differs from its peers on purpose (the rest matches veRL's core_algos and TRL to 1e-16 in
float64):
- advantages divide by (std + 1e-6), as veRL; TRL adds 1e-4. The difference is visible only for groups whose std is
  tiny, where 1e-6 keeps the advantage closer to the standardised value.
- a group of size 1 raises: its unbiased std is 0/0 and its baseline is itself (the advantage is 0), so it would
  only add noise to the normalisers; TRL and veRL let it through silently.
- k3 is not clamped by default: it is >= 0 and unbounded above, and a large value is the signal that the policy ran
  away from the reference. veRL clamps it to [-10, 10]; `k3_clamp` offers the same bound.
- no dual-clip by default: with A < 0 and a large ratio the PPO term is unbounded (-rho A). veRL caps it at -c A
  (c = 3); `dual_clip` offers the same cap. Off because with TIS and small eps the ratio rarely gets there, and the
  cap zeroes those tokens' gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------
# Advantages


def _std_group(rewards_NG: Tensor, batch: Tensor) -> Tensor:
    """Per-group std, unbiased (n - 1), as TRL and veRL compute it, so our advantages match theirs."""
    return rewards_NG.std(dim=1, keepdim=True)


def _std_none(rewards_NG: Tensor, batch: Tensor) -> Tensor:
    """Dr. GRPO: no std scaling; dividing by std up-weights near-uniform groups (too easy / too hard)."""
    return torch.ones_like(rewards_NG[:, :1])


def _std_batch(rewards_NG: Tensor, batch: Tensor) -> Tensor:
    """Std of the raw rewards over the whole batch (unbiased), as TRL's scale_rewards="batch" and the
    "group mean, batch std" recipe of Lite PPO; every group gets the same scale so no group is blown up."""
    return batch.float().std().expand(rewards_NG.shape[0], 1)


# scale(rewards_NG, batch_rewards) -> [N, 1]: the divisor of each group's centred rewards
ADVANTAGE_SCALES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "group": _std_group,
    "none": _std_none,
    "batch": _std_batch,
}


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-6,
                     batch_rewards: Tensor | None = None) -> Tensor:
    """Group-relative advantages, one per completion.

        A_i = (r_i - mean_{j in group(i)} r_j) / (s + eps)

    with s = std of the group ("group", GRPO), s = 1 ("none", Dr. GRPO), or s = std of all rewards in
    the batch ("batch"). Stds are unbiased (divide by n - 1), matching torch.std, TRL and veRL; so a
    group needs G >= 2. A group whose rewards are all equal gets A = 0 under every scaling.

    `rewards` is flat [N * G] (groups contiguous, as the rollout produces them) or [N, G]; the result has
    the same shape. "batch" takes its std over `batch_rewards` (default: `rewards`): with several processes,
    pass every rank's rewards, gathered, so each rank scales by the global batch's std, not its own.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    rewards_NG = rewards.float().reshape(-1, group_size)
    centred_NG = rewards_NG - rewards_NG.mean(dim=1, keepdim=True)
    batch = rewards_NG if batch_rewards is None else batch_rewards
    return (centred_NG / (ADVANTAGE_SCALES[scale](rewards_NG, batch) + eps)).reshape(rewards.shape)


def groups_with_signal(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling: bool mask [N] of groups whose rewards are not all equal.

    A group with equal rewards has A = 0 for every sample, so it adds no gradient, only noise in the
    normalisers; the trainer drops it and samples more prompts.
    """
    rewards_NG = rewards.reshape(-1, group_size)
    return (rewards_NG != rewards_NG[:, :1]).any(dim=1)


def refill_prompts(need: int, keep_rate: float, refills: int) -> int:
    """Prompts for one generate call that stands in for `refills` sequential rounds of dynamic sampling.

    Sequential rounds draw need, then need (1-k), need (1-k)^2, ... prompts (what is still missing), k the
    fraction of groups with signal; in expectation R rounds draw and keep

        prompts = need (1 - (1-k)^R) / k        (need R when k = 0),    groups kept = k prompts.

    One call of that size keeps as many groups in expectation with one generation instead of R: a batched
    decode's fixed cost per call (prefill, a step per token) dominates a small refill. The trainer takes k
    from the previous step (rates move slowly) and keeps at most `need` of the call's groups.
    """
    if need <= 0:
        return 0
    k = min(max(keep_rate, 0.0), 1.0)
    return math.ceil(need * (refills if k == 0 else (1 - (1 - k) ** refills) / k) - 1e-9)  # (rounding: R = 1 is need)


# ---------------------------------------------------------------------------------------------------------
# Importance ratios


def token_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """PPO/GRPO per-token ratio rho_t = pi_theta(o_t) / pi_old(o_t) = exp(logp_t - old_logp_t)."""
    return torch.exp(logp_BT - old_logp_BT)


def sequence_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """GSPO sequence ratio broadcast to tokens, in the paper's token-wise form (GSPO-token):

        s_i   = exp( (1/|o_i|) sum_t (logp_t - old_logp_t) )
        s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])

    Its value is s_i on every token of sequence i, and d s_i,t / d logp_t = s_i, so with the "grpo"
    aggregation (mean over the sequence) the gradient is exactly GSPO's. Clip it with GSPO's own small
    range (the paper uses eps_low = 3e-4, eps_high = 4e-4): a sequence ratio moves far less than a token's.
    """
    mask = mask_BT.to(logp_BT.dtype)
    # clamp: a fully masked sequence (e.g. overlong, masked out) must give s = 1, not 0/0
    length_B1 = mask.sum(-1, keepdim=True).clamp(min=1)
    log_s_B1 = ((logp_BT - old_logp_BT) * mask).sum(-1, keepdim=True) / length_B1
    return torch.exp(log_s_B1.detach() + logp_BT - logp_BT.detach())


RATIOS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": token_ratio,
    "sequence": sequence_ratio,
}


def tis_weights(old_logp_BT: Tensor, engine_logp_BT: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance sampling weights for the rollout/trainer mismatch:

        w_t = min(pi_old(o_t) / pi_engine(o_t), C) = min(exp(old_logp_t - engine_logp_t), C)

    The tokens were sampled by the engine (vLLM, bf16/fp8 kernels), not by pi_old as the trainer computes
    it; w corrects for that. Capped at C to bound the variance, and detached: it is a fixed weight on
    the sample, not something to optimise.
    """
    return torch.exp(old_logp_BT - engine_logp_BT).clamp(max=cap).detach()


def keep_all(old_logp_BT: Tensor, engine_logp_BT: Tensor, mask_BT: Tensor, low: float, high: float) -> Tensor:
    """No mismatch masking: every token kept."""
    return torch.ones_like(old_logp_BT)


def sequence_mismatch_mask(old_logp_BT: Tensor, engine_logp_BT: Tensor, mask_BT: Tensor, low: float,
                           high: float) -> Tensor:
    """Drop whole sequences whose trainer/engine probability ratio leaves [low, high] (TRL's sequence_mask, both
    sides):

        r_b = pi_old(o_b) / pi_engine(o_b) = exp(sum_t m_bt (old_logp_bt - engine_logp_bt))
        keep_b = low <= r_b <= high

    A sequence the engine sampled from a visibly different distribution (another routing, FP8 rounding that
    flipped a token) carries an off-policy gradient that TIS's cap only bounds; masking removes it."""
    log_r_B = ((old_logp_BT - engine_logp_BT) * mask_BT).sum(-1, keepdim=True)
    keep_B1 = (log_r_B >= math.log(low)) & (log_r_B <= math.log(high))
    return keep_B1.to(old_logp_BT.dtype).expand_as(old_logp_BT)


def token_mismatch_mask(old_logp_BT: Tensor, engine_logp_BT: Tensor, mask_BT: Tensor, low: float,
                        high: float) -> Tensor:
    """Drop single tokens whose ratio leaves [low, high] (IcePop, Ling team 2025: the tokens whose trainer and
    engine probabilities disagree most are the ones whose gradient the mismatch corrupts):

        r_t = exp(old_logp_t - engine_logp_t);  keep_t = low <= r_t <= high"""
    log_r_BT = old_logp_BT - engine_logp_BT
    return ((log_r_BT >= math.log(low)) & (log_r_BT <= math.log(high))).to(old_logp_BT.dtype)


MISMATCH_MASKS: dict[str, Callable[[Tensor, Tensor, Tensor, float, float], Tensor]] = {
    "none": keep_all,
    "sequence": sequence_mismatch_mask,
    "token": token_mismatch_mask,
}


def k3(logp_BT: Tensor, ref_logp_BT: Tensor, clamp: float = 0.0) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimator k3 (Schulman), unbiased and always >= 0:

    k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 = exp(ref_logp - logp) - (ref_logp - logp) - 1

    clamp > 0 bounds it to [-clamp, clamp] as veRL's low_var_kl does (10 there; k3 >= 0, so only the top binds, and
    a clamped token has no KL gradient). 0 = unclamped, r1's default.
    """
    d = ref_logp_BT - logp_BT
    kl = torch.exp(d) - d - 1
    return kl.clamp(-clamp, clamp) if clamp > 0 else kl


def dual_clip_loss(loss_BT: Tensor, advantages_B1: Tensor, c: float) -> Tensor:
    """Dual-clip PPO (Ye et al. 2020, veRL's clip_ratio_c): where A < 0 the clipped surrogate's loss
    max(-rho A, -clip(rho) A) grows without bound in rho; cap it at -c A (c > 1). Tokens with A >= 0 are unchanged.

        loss_t = min(loss_t, -c A)  if A < 0,   loss_t otherwise
    """
    return torch.where(advantages_B1 < 0, torch.minimum(loss_BT, -c * advantages_B1), loss_BT)


# ---------------------------------------------------------------------------------------------------------
# Aggregation: per-token losses -> one scalar. Each takes global normalisers so that gradient
# accumulation over micro-batches sums to exactly the loss of the whole batch.


def aggregate_grpo(
    loss_BT: Tensor, mask_BT: Tensor, num_sequences: float, num_tokens: float, max_len: int | None
) -> Tensor:
    """GRPO: mean over each sequence's tokens, then over sequences.

    L = (1/num_sequences) sum_i (1/|o_i|) sum_t loss_i,t
    Long answers get less weight per token (the length bias Dr. GRPO and DAPO point out).
    """
    mask = mask_BT.to(loss_BT.dtype)
    per_seq_B = (loss_BT * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq_B.sum() / num_sequences


def aggregate_dapo(
    loss_BT: Tensor, mask_BT: Tensor, num_sequences: float, num_tokens: float, max_len: int | None
) -> Tensor:
    """DAPO token-level mean: every token of the batch weighs the same.

    L = (1/num_tokens) sum_i sum_t loss_i,t, num_tokens = sum_i |o_i| over the whole global batch.
    """
    return (loss_BT * mask_BT.to(loss_BT.dtype)).sum() / num_tokens


def aggregate_dr_grpo(
    loss_BT: Tensor, mask_BT: Tensor, num_sequences: float, num_tokens: float, max_len: int | None
) -> Tensor:
    """Dr. GRPO: a constant normaliser, so neither length nor batch composition rescales the gradient.

    L = (1/(num_sequences * max_len)) sum_i sum_t loss_i,t, max_len = the generation limit (max_tokens),
    not the padded width of this batch (that changes from batch to batch).
    """
    if max_len is None:
        raise ValueError("the dr_grpo aggregation needs max_completion_len (the generation limit)")
    return (loss_BT * mask_BT.to(loss_BT.dtype)).sum() / (num_sequences * max_len)


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, float, float, int | None], Tensor]] = {
    "grpo": aggregate_grpo,
    "dapo": aggregate_dapo,
    "dr_grpo": aggregate_dr_grpo,
}


# ---------------------------------------------------------------------------------------------------------
# The loss


def masked_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean of x where mask is set (bool or 0/1; 0 when nothing is)."""
    mask = mask_BT.to(x_BT.dtype)
    return (x_BT * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    advantages_B: Tensor,
    mask_BT: Tensor,
    *,
    ref_logp_BT: Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float = 0.0,
    k3_clamp: float = 0.0,
    ratio: str = "token",
    aggregation: str = "grpo",
    engine_logp_BT: Tensor | None = None,
    tis_cap: float = 2.0,
    mismatch_mask: str = "none",
    mismatch_bounds: tuple[float, float] = (0.5, 2.0),
    max_completion_len: int | None = None,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss with optional KL penalty and truncated importance sampling.

        loss_t = -w_t * min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t

    rho_t from RATIOS[ratio] ("token": PPO/GRPO, "sequence": GSPO), w_t = tis_weights(old, engine, tis_cap)
    when engine log-probs are given and tis_cap > 0 (else 1; it weights the policy term only, as in TRL), k3 against the
    reference when ref_logp_BT is given (bounded by k3_clamp when > 0). dual_clip = c > 1 caps the loss of a token
    with A < 0 at -c A before the TIS weight (dual_clip_loss; 0 = off). With engine log-probs,
    MISMATCH_MASKS[mismatch_mask] (bounds `mismatch_bounds`) zeroes the loss of dropped tokens or sequences
    (keep_t in {0, 1}: loss_t *= keep_t; the normalisers are unchanged). Reduced to a scalar by
    AGGREGATIONS[aggregation].

    logp_BT: log pi_theta of the sampled tokens (with grad); old_logp_BT: log pi_old, rollout-time
    (detached here: pi_old is a constant of the objective; pass logp_BT.detach() when mu = 1);
    advantages_B: one per sequence; mask_BT: 1 on completion tokens (pads must hold finite log-probs,
    e.g. 0: they are multiplied by the mask, and 0 * inf is NaN).
    num_sequences / num_tokens: normalisers of the global batch when the batch is split in micro-batches
    (defaults: this call's B and mask.sum()). Per micro-batch losses then add up to the full-batch loss.

    Returns (loss, metrics); metrics are detached scalars, means over this call's completion tokens:
    clip_ratio/low_mean (A < 0 and rho < 1 - eps_low), clip_ratio/high_mean (A > 0 and rho > 1 + eps_high),
    clip_ratio/region_mean (either), kl (mean k3, when ref_logp_BT is given), tis/mean and
    mismatch/masked_fraction (when engine log-probs are given). The clip ratios count the tokens whose gradient
    the clip zeroes.
    """
    if not (logp_BT.shape == old_logp_BT.shape == mask_BT.shape and advantages_B.shape == logp_BT.shape[:1]):
        raise ValueError(
            f"shape mismatch: logp {tuple(logp_BT.shape)}, old_logp {tuple(old_logp_BT.shape)}, "
            f"mask {tuple(mask_BT.shape)}, advantages {tuple(advantages_B.shape)}"
        )
    old_logp_BT = old_logp_BT.detach()
    A_B1 = advantages_B.detach().to(logp_BT.dtype).unsqueeze(1)
    rho_BT = RATIOS[ratio](logp_BT, old_logp_BT, mask_BT)
    clipped_BT = rho_BT.clamp(1 - eps_low, 1 + eps_high)
    # min of the two surrogates: where the clipped one is smaller its gradient is 0 (clamp saturates)
    loss_BT = -torch.min(rho_BT * A_B1, clipped_BT * A_B1)
    if dual_clip > 0:
        loss_BT = dual_clip_loss(loss_BT, A_B1, dual_clip)

    metrics: dict[str, Tensor] = {}
    if engine_logp_BT is not None:
        if tis_cap > 0:
            w_BT = tis_weights(old_logp_BT, engine_logp_BT, tis_cap)
            loss_BT = loss_BT * w_BT
            metrics["tis/mean"] = masked_mean(w_BT, mask_BT)
        keep_BT = MISMATCH_MASKS[mismatch_mask](old_logp_BT, engine_logp_BT.detach(), mask_BT, *mismatch_bounds)
        loss_BT = loss_BT * keep_BT
        metrics["mismatch/masked_fraction"] = masked_mean(1 - keep_BT, mask_BT)
    if ref_logp_BT is not None:
        kl_BT = k3(logp_BT, ref_logp_BT.detach(), k3_clamp)
        loss_BT = loss_BT + beta * kl_BT
        metrics["kl"] = masked_mean(kl_BT.detach(), mask_BT)

    with torch.no_grad():
        low = (rho_BT < 1 - eps_low) & (A_B1 < 0)
        high = (rho_BT > 1 + eps_high) & (A_B1 > 0)
        metrics["clip_ratio/low_mean"] = masked_mean(low.to(logp_BT.dtype), mask_BT)
        metrics["clip_ratio/high_mean"] = masked_mean(high.to(logp_BT.dtype), mask_BT)
        metrics["clip_ratio/region_mean"] = masked_mean((low | high).to(logp_BT.dtype), mask_BT)

    n_seq = logp_BT.shape[0] if num_sequences is None else num_sequences
    n_tok = mask_BT.sum().clamp(min=1) if num_tokens is None else num_tokens
    loss = AGGREGATIONS[aggregation](loss_BT, mask_BT, n_seq, n_tok, max_completion_len)
    return loss, metrics
