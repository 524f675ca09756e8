"""GRPO maths against values worked out by hand (the comments show the arithmetic)."""

import math

import pytest
import torch

from r1.grpo import (
    dual_clip_loss,
    group_advantages,
    groups_with_signal,
    k3,
    policy_loss,
    refill_prompts,
    sequence_ratio,
    tis_weights,
)

LN2 = math.log(2.0)

# ---------------------------------------------------------------------------------------------------------
# advantages

# two groups of G = 3: [0, 3, 6] (mean 3, unbiased std sqrt(18/2) = 3) and [1, 2, 3] (mean 2, std 1)
REWARDS = torch.tensor([0.0, 3.0, 6.0, 1.0, 2.0, 3.0])


def test_advantages_group_scaling_uses_unbiased_group_std():
    adv = group_advantages(REWARDS, 3, "group")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0]), atol=1e-5, rtol=0)


def test_advantages_no_scaling_is_centred_rewards():
    adv = group_advantages(REWARDS, 3, "none")
    torch.testing.assert_close(adv, torch.tensor([-3.0, 0.0, 3.0, -1.0, 0.0, 1.0]), atol=1e-5, rtol=0)


def test_advantages_batch_scaling_uses_std_of_all_rewards():
    # batch mean 2.5; squared deviations 6.25 .25 12.25 2.25 .25 .25 = 21.5; unbiased var 21.5 / 5 = 4.3
    adv = group_advantages(REWARDS, 3, "batch")
    expected = torch.tensor([-3.0, 0.0, 3.0, -1.0, 0.0, 1.0]) / math.sqrt(4.3)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_advantages_keep_shape_and_equal_rewards_give_zero_not_nan():
    rewards_NG = torch.tensor([[2.0, 2.0], [0.0, 1.0]])
    adv = group_advantages(rewards_NG, 2, "group")
    assert adv.shape == (2, 2)
    # second group: mean .5, unbiased std sqrt(.5) -> +-0.5 / sqrt(.5) = +-sqrt(.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0], [-(0.5**0.5), 0.5**0.5]]), atol=1e-5, rtol=0)


def test_advantages_reject_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_groups_with_signal():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.5])
    assert groups_with_signal(rewards, 3).tolist() == [False, True, False, True]


# ---------------------------------------------------------------------------------------------------------
# the 2 x 3 example: rho = exp(logp - old_logp), eps = 0.2, A = [1, -2], second row has one pad
#   row 0 (A = 1):  rho 1.0 -> -1.0 | rho 1.5 -> -min(1.5, 1.2) = -1.2 (high clip) | rho 0.5 -> -0.5
#                   sum -2.7 over 3 tokens, mean -0.9
#   row 1 (A = -2): rho 0.5 -> -min(-1.0, -1.6) = 1.6 (low clip) | rho 1.1 -> 2.2 | pad (rho 0.1)
#                   sum 3.8 over 2 tokens, mean 1.9
# total sum 1.1 over 5 tokens

RHO = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.1, 0.1]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -2.0]])



def test_refill_prompts_values():
    assert refill_prompts(10, 0.5, 2) == 15  # 10 (1 - 0.25) / 0.5
    assert refill_prompts(10, 0.0, 2) == 20  # nothing kept so far: R refills' worth
    assert refill_prompts(10, 1.0, 3) == 10
    assert refill_prompts(10, 0.3, 1) == 10  # one refill draws what is missing, whatever k
    assert refill_prompts(0, 0.3, 2) == 0


def test_refill_prompts_match_sequential_refills_in_expectation():
    """Simulated sequential refills (each draws what is still missing, keeps each group with probability k)
    draw, on average, what one batched refill draws."""
    gen = torch.Generator().manual_seed(0)
    for need, k, R in ((12, 0.35, 2), (20, 0.6, 3), (7, 0.1, 2)):
        draws = []
        for _ in range(4000):
            missing, drawn = need, 0
            for _ in range(R):
                drawn += missing
                missing -= int((torch.rand(missing, generator=gen) < k).sum())
            draws.append(drawn)
        mean = sum(draws) / len(draws)
        assert abs(refill_prompts(need, k, R) - mean) <= 1.0, (need, k, R, mean)

def _loss(aggregation: str, **kw):
    logp = (OLD + RHO.log()).requires_grad_()
    loss, metrics = policy_loss(logp, OLD, ADV, MASK, aggregation=aggregation, **kw)
    return loss, metrics, logp


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("grpo", (-0.9 + 1.9) / 2),  # 0.5
        ("dapo", 1.1 / 5),  # 0.22
        ("dr_grpo", 1.1 / (2 * 4)),  # max_completion_len = 4: 0.1375
    ],
)
def test_loss_aggregations(aggregation, expected):
    loss, _, _ = _loss(aggregation, max_completion_len=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_clip_metrics_count_only_completion_tokens():
    # the pad has rho 0.1 and A < 0: it would count as low-clipped if the mask were ignored
    _, m, _ = _loss("grpo")
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    assert "kl" not in m and "tis/mean" not in m


def test_gradient_is_zero_exactly_where_clipping_is_active():
    # d loss / d logp_t = -A rho_t / |o_i| / B where unclipped (grpo), 0 where clipped or padded:
    #   row 0: -1 * 1.0 / 3 / 2 = -1/6 | 0 (high clip) | -1 * 0.5 / 6 = -1/12
    #   row 1: 0 (low clip) | 2 * 1.1 / 2 / 2 = 0.55 | 0 (pad)
    loss, _, logp = _loss("grpo")
    loss.backward()
    expected = torch.tensor([[-1 / 6, 0.0, -1 / 12], [0.0, 0.55, 0.0]])
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=0)
    assert logp.grad[0, 1].item() == 0.0 and logp.grad[1, 0].item() == 0.0


def test_dr_grpo_needs_max_completion_len():
    with pytest.raises(ValueError, match="max_completion_len"):
        _loss("dr_grpo")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(OLD, OLD, ADV[:1], MASK)


# ---------------------------------------------------------------------------------------------------------
# ratio 1: the loss gradient is the plain policy gradient


@pytest.mark.parametrize(
    "aggregation, norm",
    [
        # mask lengths 3, 1, 2 -> B = 3, 6 tokens, max_completion_len 5
        ("grpo", lambda lengths: 3 * lengths),  # -A_i / |o_i| / B
        ("dapo", lambda lengths: torch.full_like(lengths, 6.0)),  # -A_i / total tokens
        ("dr_grpo", lambda lengths: torch.full_like(lengths, 3 * 5.0)),  # -A_i / (B * L)
    ],
)
@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_on_policy_gradient_is_policy_gradient(aggregation, norm, ratio):
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.5, -1.5, 2.0])
    loss, m = policy_loss(
        logp, logp.detach(), adv, mask, ratio=ratio, aggregation=aggregation, max_completion_len=5
    )
    loss.backward()
    lengths = torch.tensor([3.0, 1.0, 2.0])
    expected = (-adv / norm(lengths)).unsqueeze(1) * mask
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=0)
    assert m["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_with_global_normalisers_add_up_to_the_batch_loss(aggregation):
    full, _, _ = _loss(aggregation, max_completion_len=4)
    logp = OLD + RHO.log()

    def micro(i: int, **norms) -> float:
        rows = slice(i, i + 1)
        kw = dict(aggregation=aggregation, max_completion_len=4, **norms)
        return policy_loss(logp[rows], OLD[rows], ADV[rows], MASK[rows], **kw)[0].item()

    assert micro(0, num_sequences=2, num_tokens=5) + micro(1, num_sequences=2, num_tokens=5) == pytest.approx(
        full.item(), abs=1e-6
    )
    # with local normalisers the sum is wrong (e.g. dapo: -2.7/3 + 3.8/2 = 1.0, not 0.22)
    assert micro(0) + micro(1) != pytest.approx(full.item(), abs=1e-3)


# ---------------------------------------------------------------------------------------------------------
# KL, TIS, GSPO, entropy


def test_k3_values():
    # d = ref - logp: d = ln2 -> 2 - ln2 - 1; d = 0 -> 0; d = -ln2 -> 1/2 + ln2 - 1
    logp = torch.zeros(3)
    ref = torch.tensor([LN2, 0.0, -LN2])
    torch.testing.assert_close(k3(logp, ref), torch.tensor([1 - LN2, 0.0, LN2 - 0.5]))


def test_kl_penalty_in_loss():
    # A = 0 so only beta * k3 remains: mean k3 = ((1 - ln2) + (ln2 - .5)) / 2 = .25, loss = .5 * .25
    logp = torch.tensor([[-1.0, -2.0]])
    ref = logp + torch.tensor([[LN2, -LN2]])
    loss, m = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), ref_logp_BT=ref, beta=0.5)
    assert loss.item() == pytest.approx(0.125)
    assert m["kl"].item() == pytest.approx(0.25)


def test_tis_weights_are_capped_and_detached():
    old = torch.tensor([[math.log(3.0), math.log(0.5), -1.0]], requires_grad=True)
    engine = torch.tensor([[0.0, 0.0, -1.0]], requires_grad=True)
    w = tis_weights(old, engine, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0]]))  # 3 capped at 2
    assert not w.requires_grad


def test_tis_weights_scale_the_policy_gradient_only():
    # on-policy (rho 1), A = 1, 3 tokens, grpo: grad_t = -w_t / 3; engine/old get no gradient
    logp = torch.full((1, 3), -1.0, requires_grad=True)
    old = logp.detach().clone().requires_grad_()
    engine = (old.detach() - torch.tensor([[math.log(3.0), math.log(0.5), 0.0]])).requires_grad_()
    loss, m = policy_loss(logp, old, torch.ones(1), torch.ones(1, 3), engine_logp_BT=engine, tis_cap=2.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 3, -0.5 / 3, -1 / 3]]))
    assert old.grad is None and engine.grad is None
    assert m["tis/mean"].item() == pytest.approx(3.5 / 3)


def test_mismatch_masks_drop_tokens_and_sequences_outside_the_bounds():
    # per-token log ratios old - engine: row 0 [ln3, 0, 0] (a token at ratio 3), row 1 [ln1.5, ln1.5, pad ln100]
    # token mask [1/2, 2]: drops row 0's first token only (3 > 2; 1.5 is in). sequence mask: row 0's product is 3
    # -> dropped; row 1's is 1.5 * 1.5 = 2.25 -> dropped too, had the pad counted (x100) it would be anyway, so
    # bound 2.5 keeps it: the pad must not enter the sum.
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    old = logp.detach().clone()
    log_r = torch.tensor([[math.log(3.0), 0.0, 0.0], [math.log(1.5), math.log(1.5), math.log(100.0)]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kw = dict(engine_logp_BT=old - log_r, tis_cap=0.0, aggregation="grpo")
    loss, m = policy_loss(logp, old, torch.ones(2), mask, mismatch_mask="token", mismatch_bounds=(0.5, 2.0), **kw)
    loss.backward()
    # grpo: per-sequence token mean, then mean over 2 sequences: grad_t = -keep_t / (2 * len_b)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -1 / 6, -1 / 6], [-1 / 4, -1 / 4, 0.0]]))
    assert m["mismatch/masked_fraction"].item() == pytest.approx(1 / 5) and "tis/mean" not in m
    for high, want in ((2.0, [0.0, 0.0]), (2.5, [0.0, 1.0])):
        logp.grad = None
        loss, m = policy_loss(logp, old, torch.ones(2), mask, mismatch_mask="sequence", mismatch_bounds=(0.5, high),
                              **kw)
        loss.backward()
        kept = [bool(logp.grad[b].abs().sum() > 0) for b in range(2)]
        assert kept == [bool(w) for w in want]
        assert m["mismatch/masked_fraction"].item() == pytest.approx((3 * (1 - want[0]) + 2 * (1 - want[1])) / 5)
    logp.grad = None
    policy_loss(logp, old, torch.ones(2), mask, mismatch_mask="none", **kw)[0].backward()
    assert (logp.grad[mask > 0] != 0).all()  # none keeps every token


def test_gspo_sequence_ratio_value_and_token_gradient():
    # log ratios ln2, ln8 on the two completion tokens: s = exp((ln2 + ln8) / 2) = exp(ln4) = 4;
    # the pad (log ratio ln100) must not enter the mean. d s_t / d logp_t = s = 4 on every token.
    old = torch.zeros(1, 3)
    logp = torch.tensor([[LN2, math.log(8.0), math.log(100.0)]], requires_grad=True)
    s = sequence_ratio(logp, old, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(s.detach(), torch.full((1, 3), 4.0))
    (s * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[4.0, 8.0, 12.0]]))


def test_gspo_clips_whole_sequences():
    # row 0: s = 4 > 1 + 4e-4 with A = 1 -> every token clipped, no gradient.
    # row 1: log ratios 2e-4, 0 -> s = exp(1e-4), inside [1 - 3e-4, 1 + 4e-4], A = -1:
    #        grad_t = -A s / |o| / B = exp(1e-4) / 2 / 2
    old = torch.zeros(2, 2)
    logp = torch.tensor([[LN2, math.log(8.0)], [2e-4, 0.0]], requires_grad=True)
    loss, m = policy_loss(
        logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), ratio="sequence", eps_low=3e-4, eps_high=4e-4
    )
    loss.backward()
    g = math.exp(1e-4) / 4
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [g, g]]), atol=1e-7, rtol=0)
    assert m["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert m["clip_ratio/low_mean"].item() == 0.0


def test_batch_scaling_takes_the_std_of_the_rewards_it_is_given():
    """With several processes each rank passes the gathered global rewards: its slice of groups then gets exactly
    the advantages of the whole batch."""
    whole = group_advantages(REWARDS, 3, "batch")
    part = group_advantages(REWARDS[3:], 3, "batch", batch_rewards=REWARDS)
    torch.testing.assert_close(part, whole[3:], atol=0, rtol=0)
    # its own std would differ: [1, 2, 3] has std 1, the batch sqrt(4.3)
    assert not torch.allclose(group_advantages(REWARDS[3:], 3, "batch"), whole[3:])


def test_dual_clip_caps_negative_advantage_losses_at_c():
    """Two tokens with A = -1 (ratios 5, 2) and two with A = +1 (ratios 5, 1), eps 0.2, DAPO token mean over 4:
    clipped PPO losses -min(rho A, clip(rho) A): 5, 2 | -1.2, -1. Dual-clip c = 3 caps the first at 3 (veRL's
    min(-c A, loss) where A < 0), so the loss is (3 + 2 - 1.2 - 1) / 4 = 0.7 instead of 1.2, and that token's
    gradient is 0; the other gradients are d(rho)/d(logp) / 4 = rho / 4 for A = -1, 0 where clipped, -1/4."""
    log_ratio = torch.tensor([[math.log(5.0), LN2], [math.log(5.0), 0.0]])
    A = torch.tensor([-1.0, 1.0])
    out = {}
    for c in (0.0, 3.0):
        logp = log_ratio.clone().requires_grad_(True)
        loss, _ = policy_loss(logp, torch.zeros(2, 2), A, torch.ones(2, 2), eps_low=0.2, eps_high=0.2,
                              aggregation="dapo", dual_clip=c)
        loss.backward()
        out[c] = (loss.item(), logp.grad)
    assert out[0.0][0] == pytest.approx(1.2) and out[3.0][0] == pytest.approx(0.7)
    torch.testing.assert_close(out[0.0][1], torch.tensor([[1.25, 0.5], [0.0, -0.25]]))
    torch.testing.assert_close(out[3.0][1], torch.tensor([[0.0, 0.5], [0.0, -0.25]]))
    # the pure function: only A < 0 rows are capped
    capped = dual_clip_loss(torch.tensor([[5.0, 2.0], [5.0, -1.0]]), torch.tensor([[-1.0], [1.0]]), 3.0)
    assert capped.tolist() == [[3.0, 2.0], [5.0, -1.0]]


def test_k3_clamp():
    """ref/theta = 20: k3 = 20 - ln 20 - 1 = 16.004, clamped to 10 (veRL's bound); ref/theta = 1/2: k3 = 0.5 + ln 2
    - 1 = 0.193, unchanged. Unclamped by default."""
    logp, ref = torch.zeros(2), torch.tensor([math.log(20.0), -LN2])
    assert k3(logp, ref).tolist() == pytest.approx([20 - math.log(20) - 1, 0.5 + LN2 - 1], abs=1e-5)
    assert k3(logp, ref, clamp=10.0).tolist() == pytest.approx([10.0, 0.5 + LN2 - 1], abs=1e-5)
    lp = logp.view(1, 2).clone().requires_grad_(True)
    _, m = policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2), ref_logp_BT=ref.view(1, 2), beta=0.1,
                       k3_clamp=10.0)
    assert m["kl"].item() == pytest.approx((10.0 + 0.5 + LN2 - 1) / 2, abs=1e-5)
