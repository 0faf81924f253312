"""Hand-computed checks for stages.objectives.losses.

Every expected number below is written out (with the arithmetic in a
comment) so a regression in any formula makes the test fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from stages.objectives.losses import (
    gae_advantages,
    group_advantages,
    grpo_loss,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    rrhf_loss,
    tied_groups,
)


def T(data: object, **kwargs: object) -> torch.Tensor:
    """float32 tensor shorthand."""
    return torch.tensor(data, dtype=torch.float32, **kwargs)


# --------------------------------------------------------------------------- masked_mean / whiten


def test_masked_mean_all_and_per_row() -> None:
    values = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 3
    assert_close(masked_mean(values, mask), torch.tensor(7.0 / 3.0))
    # row 0: (1 + 2) / 2, row 1: 4 / 1
    assert_close(masked_mean(values, mask, dim=1), T([1.5, 4.0]))


def test_masked_mean_bool_mask_and_zero_rows() -> None:
    values = T([[1.0, 2.0], [10.0, 20.0]])
    mask = torch.tensor([[True, True], [False, False]])
    # The empty row must give 0, not NaN (count clamped to 1).
    assert_close(masked_mean(values, mask, dim=1), T([1.5, 0.0]))
    assert_close(masked_mean(values, torch.zeros_like(mask)), torch.tensor(0.0))


def test_masked_whiten_unbiased_and_shift_mean() -> None:
    values = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1, 1, 1, 0]])
    # masked mean 2, unbiased var ((1 + 0 + 1) / (3 - 1)) = 1 -> std 1; the 100 is ignored.
    assert_close(masked_whiten(values, mask), T([[-1.0, 0.0, 1.0, 0.0]]))
    assert_close(masked_whiten(values, mask, shift_mean=False), T([[1.0, 2.0, 3.0, 0.0]]))

    # mean 4, unbiased var (4 + 0 + 4) / 2 = 4 -> std 2 (biased would give std 1.633).
    values = T([[2.0, 4.0, 6.0]])
    assert_close(masked_whiten(values, torch.ones_like(values)), T([[-1.0, 0.0, 1.0]]))
    assert_close(masked_whiten(values, torch.ones_like(values), shift_mean=False), T([[3.0, 4.0, 5.0]]))


# --------------------------------------------------------------------------- reward model


def test_pairwise_reward_loss_values() -> None:
    # -logsigmoid(1) = log(1 + e^-1) = 0.31326168..., -logsigmoid(0) = log 2.
    loss = pairwise_reward_loss(T([1.0, 0.0]), T([0.0, 0.0]))
    assert_close(loss, torch.tensor((math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2))
    assert_close(loss, torch.tensor(0.5032044340390841))


def test_pairwise_reward_loss_margin() -> None:
    # scalar margin: diff 2 - 0 - 1 = 1 -> 0.31326168...
    loss = pairwise_reward_loss(T([2.0]), T([0.0]), margin=1.0)
    assert_close(loss, torch.tensor(0.31326168751822286))
    # per-example margin: diffs (1 - 1, 1 - 0) = (0, 1)
    loss = pairwise_reward_loss(T([1.0, 1.0]), T([0.0, 0.0]), margin=T([1.0, 0.0]))
    assert_close(loss, torch.tensor(0.5032044340390841))


def test_pairwise_reward_loss_gradients() -> None:
    chosen = T([1.0, 0.0], requires_grad=True)
    rejected = T([0.0, 0.0], requires_grad=True)
    pairwise_reward_loss(chosen, rejected).backward()
    # d/dx -logsigmoid(x) = -sigmoid(-x); divided by B = 2.
    # sigmoid(-1) = 0.26894142, sigmoid(0) = 0.5
    expected = T([-0.2689414213699951 / 2, -0.5 / 2])
    assert_close(chosen.grad, expected)
    assert_close(rejected.grad, -expected)


# --------------------------------------------------------------------------- KL-penalised rewards


def test_kl_penalized_rewards_ragged_and_empty_rows() -> None:
    logprobs = T([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = T([[-1.5, -0.5, -1.0, -2.0], [-1.0, -1.0, -1.0, -1.0], [-3.0, -3.0, -3.0, -3.0]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    scores = T([2.0, 3.0, 5.0])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # row 0: kl = (0.5, -0.5, 0, [1 masked -> 0]); rewards = -0.1 * kl, +2 at t=2
    # row 1: kl = (-1, masked...);                 rewards = (0.1 + 3, 0, 0, 0)
    # row 2: no valid token -> no KL and no score.
    assert_close(kl, T([[0.5, -0.5, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert_close(rewards, T([[-0.05, 0.05, 2.0, 0.0], [3.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


def test_kl_penalized_rewards_non_prefix_mask() -> None:
    # Response tokens in the middle (prompt masked on the left, padding on the right):
    # the score must land on t=2, the last *valid* token.
    logprobs = torch.zeros(1, 4)
    mask = T([[0, 1, 1, 0]])
    rewards, kl = kl_penalized_rewards(T([1.5]), logprobs, logprobs, mask, kl_coef=0.2)
    assert_close(rewards, T([[0.0, 0.0, 1.5, 0.0]]))
    assert_close(kl, torch.zeros(1, 4))


def test_kl_penalized_rewards_gradient() -> None:
    logprobs = T([[-1.0, -2.0, -3.0]], requires_grad=True)
    scores = T([1.0], requires_grad=True)
    rewards, _ = kl_penalized_rewards(scores, logprobs, torch.zeros(1, 3), T([[1, 1, 0]]), 0.5)
    rewards.sum().backward()
    # d(-0.5 * logprob)/dlogprob = -0.5 on valid tokens, 0 on the masked one.
    assert_close(logprobs.grad, T([[-0.5, -0.5, 0.0]]))
    assert_close(scores.grad, T([1.0]))


# --------------------------------------------------------------------------- GAE


def test_gae_hand_computed_1x3() -> None:
    rewards = T([[1.0, 0.0, 2.0]])
    values = T([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # gamma * lam = 0.72; V after the last token = 0 (terminal).
    # t=2: delta = 2 + 0.9*0   - 1.5 = 0.5              A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35             A1 = 0.35 + 0.72*0.5  = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4              A0 = 1.4  + 0.72*0.71 = 1.9112
    # returns = A + V = (2.4112, 1.71, 2.0)
    assert_close(adv, T([[1.9112, 0.71, 0.5]]))
    assert_close(ret, T([[2.4112, 1.71, 2.0]]))


def test_gae_gamma_lam_one_gives_reward_to_go() -> None:
    # With gamma = lam = 1, returns are the undiscounted reward-to-go, independent of V.
    rewards = T([[1.0, 0.0, 2.0]])
    values = T([[0.3, -4.0, 7.0]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(ret, T([[3.0, 2.0, 2.0]]))
    assert_close(adv, T([[2.7, 6.0, -5.0]]))


def test_gae_ragged_and_empty_rows() -> None:
    # Padding positions hold junk (reward 7, value 9) that must not leak in.
    rewards = T([[1.0, 0.0, 2.0, 7.0], [3.0, 7.0, 7.0, 7.0], [7.0, 7.0, 7.0, 7.0]])
    values = T([[0.5, 1.0, 1.5, 9.0], [1.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: same as the 1x3 case (V beyond the end is 0, not 9).
    # row 1: single token: delta = 3 + 0.9*0 - 1 = 2, return = 3.
    # row 2: empty -> zeros.
    assert_close(adv, T([[1.9112, 0.71, 0.5, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0] * 4]))
    assert_close(ret, T([[2.4112, 1.71, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0] * 4]))


# --------------------------------------------------------------------------- PPO policy loss


def _policy_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Ratios (1.5, 0.5, 1.1, 0.7) + a masked 5th token with a wild ratio and advantage.
    ratios = T([[1.5, 0.5, 1.1, 0.7, 3.0]])
    logprobs = ratios.log().clone().requires_grad_(True)
    old_logprobs = torch.zeros(1, 5)
    advantages = T([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = T([[1, 1, 1, 1, 0]])
    return logprobs, old_logprobs, advantages, mask


def test_ppo_policy_loss_values_and_stats() -> None:
    logprobs, old_logprobs, advantages, mask = _policy_inputs()
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    # per token max(-A*r, -A*clip(r, 0.8, 1.2)):
    # t0: r=1.5, A=+1: max(-1.5, -1.2) = -1.2   (clipped active)
    # t1: r=0.5, A=+1: max(-0.5, -0.8) = -0.5   (unclipped; ratio out of range but not clipped)
    # t2: r=1.1, A=-1: max( 1.1,  1.1) =  1.1   (inside range)
    # t3: r=0.7, A=-1: max( 0.7,  0.8) =  0.8   (clipped active)
    # loss = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05
    assert_close(loss, torch.tensor(0.05))
    assert stats["clipfrac"] == pytest.approx(0.5)  # t0 and t3 only
    assert stats["ratio_mean"] == pytest.approx(0.95)  # (1.5 + 0.5 + 1.1 + 0.7) / 4
    # k3: mean((r - 1) - log r) = mean(0.0945349, 0.1931472, 0.0046898, 0.0566749)
    assert stats["approx_kl"] == pytest.approx(0.08726170914654711, rel=1e-5)
    assert all(isinstance(v, float) for v in stats.values())


def test_ppo_policy_loss_gradient_only_through_unclipped_tokens() -> None:
    logprobs, old_logprobs, advantages, mask = _policy_inputs()
    loss, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    loss.backward()
    # d/dlogp (-A * r) = -A * r, / 4 valid tokens; clipped and masked tokens get 0.
    # t1: -1 * 0.5 / 4 = -0.125, t2: +1 * 1.1 / 4 = 0.275
    assert_close(logprobs.grad, T([[0.0, -0.125, 0.275, 0.0, 0.0]]))


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage() -> None:
    # ratio == 1 everywhere: loss = -mean(A) over valid tokens, nothing clipped, KL 0.
    logprobs = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    advantages = T([[1.0, 2.0, 3.0], [4.0, 8.0, 8.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, clip_eps=0.2)
    assert_close(loss, torch.tensor(-(1.0 + 2.0 + 3.0 + 4.0) / 4))
    assert stats == pytest.approx({"clipfrac": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0})


# --------------------------------------------------------------------------- PPO value loss


def test_ppo_value_loss_values_grad_and_clipfrac() -> None:
    values = T([[1.0, 0.0, 2.0, 50.0]], requires_grad=True)
    old_values = T([[0.5, 0.0, 0.0, 0.0]])
    returns = T([[2.0, 1.0, 0.0, 0.0]])
    mask = T([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # t0: V_clip = 0.5 + 0.2 = 0.7: max((1-2)^2, (0.7-2)^2) = max(1, 1.69) = 1.69 (clipped)
    # t1: V_clip = 0:                max(1, 1)                       = 1
    # t2: V_clip = 0.2:              max((2-0)^2, 0.2^2) = max(4, 0.04) = 4 (unclipped)
    # loss = 0.5 * (1.69 + 1 + 4) / 3 = 1.115
    assert_close(loss, torch.tensor(1.115))
    assert stats["vf_clipfrac"] == pytest.approx(1.0 / 3.0)
    loss.backward()
    # d/dV 0.5 * err / 3: t0 saturated clip -> 0; t1: 2*(0-1)/6 = -1/3; t2: 2*2/6 = 2/3.
    assert_close(values.grad, T([[0.0, -1.0 / 3.0, 2.0 / 3.0, 0.0]]))


# --------------------------------------------------------------------------- RRHF


def test_rrhf_single_group() -> None:
    seq_logprobs = T([[-1.0, -2.0, -0.5]], requires_grad=True)
    rewards = T([[1.0, 2.0, 3.0]])
    sft_nll = T([[1.0, 2.0, 0.5]], requires_grad=True)
    loss, stats = rrhf_loss(seq_logprobs, rewards, torch.ones(1, 3), sft_nll)
    # pairs r_i < r_j: (0,1): max(0, -1 - -2) = 1; (0,2): max(0, -1 + 0.5) = 0;
    # (1,2): max(0, -2 + 0.5) = 0 -> rank 1. Best reward is candidate 2 -> sft 0.5.
    assert_close(loss, torch.tensor(1.5))
    assert stats == pytest.approx({"rank_loss": 1.0, "sft_loss": 0.5})
    loss.backward()
    # Only pair (0,1) is active: +1 on p0, -1 on p1. SFT grad only on the best candidate.
    assert_close(seq_logprobs.grad, T([[1.0, -1.0, 0.0]]))
    assert_close(sft_nll.grad, T([[0.0, 0.0, 1.0]]))


def test_rrhf_ties_contribute_nothing() -> None:
    # r = (1, 1, 2). The tie (0,1) would add max(0, -1 + 3) = 2 if counted.
    # (0,2): max(0, -1 + 2) = 1; (1,2): max(0, -3 + 2) = 0 -> rank 1.
    seq_logprobs = T([[-1.0, -3.0, -2.0]])
    rewards = T([[1.0, 1.0, 2.0]])
    sft_nll = T([[1.0, 3.0, 2.0]])
    loss, stats = rrhf_loss(seq_logprobs, rewards, torch.ones(1, 3), sft_nll)
    assert stats == pytest.approx({"rank_loss": 1.0, "sft_loss": 2.0})
    assert_close(loss, torch.tensor(3.0))


def test_rrhf_all_tied_group_has_only_sft() -> None:
    # All rewards equal: no ranking pairs; SFT picks the first max (candidate 0).
    loss, stats = rrhf_loss(T([[-5.0, -1.0]]), T([[2.0, 2.0]]), torch.ones(1, 2), T([[0.4, 0.9]]))
    assert stats == pytest.approx({"rank_loss": 0.0, "sft_loss": 0.4})
    assert_close(loss, torch.tensor(0.4))


def test_rrhf_batch_with_padding_and_single_candidate() -> None:
    nan, inf = float("nan"), float("inf")
    seq_logprobs = T([[-1.0, -2.0, -0.5], [-0.3, -inf, nan], [-1.0, -3.0, -2.0]], requires_grad=True)
    # Group 1 pads with huge rewards: they must neither rank nor be picked for SFT.
    rewards = T([[1.0, 2.0, 3.0], [0.0, 100.0, 50.0], [1.0, 1.0, 2.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, True]])
    sft_nll = T([[1.0, 2.0, 0.5], [0.7, inf, nan], [1.0, 3.0, 2.0]], requires_grad=True)
    loss, stats = rrhf_loss(seq_logprobs, rewards, mask, sft_nll)
    # g0: rank 1, sft 0.5 | g1 (single valid): rank 0, sft 0.7 | g2 (tie): rank 1, sft 2.0
    # rank = 2/3, sft = 3.2/3, loss = 5.2/3
    assert stats["rank_loss"] == pytest.approx(2.0 / 3.0)
    assert stats["sft_loss"] == pytest.approx(3.2 / 3.0)
    assert_close(loss, torch.tensor(5.2 / 3.0))
    loss.backward()
    third = 1.0 / 3.0
    assert_close(seq_logprobs.grad, T([[third, -third, 0.0], [0.0] * 3, [third, 0.0, -third]]))
    assert_close(sft_nll.grad, T([[0.0, 0.0, third], [third, 0.0, 0.0], [0.0, 0.0, third]]))


def test_rrhf_fully_padded_group_is_excluded_from_mean() -> None:
    seq_logprobs = T([[-1.0, -2.0, -0.5], [0.0, 0.0, 0.0]])
    rewards = T([[1.0, 2.0, 3.0], [5.0, 1.0, 0.0]])
    mask = T([[1, 1, 1], [0, 0, 0]])
    sft_nll = T([[1.0, 2.0, 0.5], [9.0, 9.0, 9.0]])
    loss, stats = rrhf_loss(seq_logprobs, rewards, mask, sft_nll)
    # Only group 0 counts (same numbers as test_rrhf_single_group).
    assert_close(loss, torch.tensor(1.5))
    assert stats == pytest.approx({"rank_loss": 1.0, "sft_loss": 0.5})


def test_group_advantages_centre_and_scale_per_group() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased, of [1, 0, 0, 1]
    assert_close(
        group_advantages(rewards, scale=True),
        torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]) / torch.tensor([[std + 1e-4], [1e-4]]),
    )
    assert_close(group_advantages(rewards, scale=False), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]))


@pytest.mark.parametrize("scale", [True, False])
def test_tied_rewards_at_a_large_non_round_value_give_exactly_zero_advantage(scale: bool) -> None:
    """Issue 29, fault 5: a checker returning 960.666259765625 for all G=8 responses gave advantages up to
    0.53 (scale) and 1.2e-4 (no scale) from float32 rounding of the group mean, and Adam made full steps
    of them. A tied group is exactly 0; a group that really differs, at the same scale, is not."""
    tied = torch.full((1, 8), 960.666259765625)
    differs = torch.tensor([[960.666259765625] * 7 + [961.666259765625]])
    rewards = torch.cat([tied, differs, torch.zeros(1, 8)])
    advantages = group_advantages(rewards, scale=scale)
    assert torch.equal(advantages[0], torch.zeros(8)) and torch.equal(advantages[2], torch.zeros(8))
    assert advantages[1, -1] > 0.5 and advantages[1, 0] < 0
    assert tied_groups(rewards).tolist() == [True, False, True]


def test_grpo_loss_hand_computed_surrogate_clip_and_kl() -> None:
    """Two responses, 2 + 1 valid tokens. Token (0, 0): ratio 1.5 with advantage 1 is clipped to 1.2,
    and the reference is 2x likelier there (k3 = 2 - ln 2 - 1). Token (1, 0): ratio 1, advantage -0.5."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    old = torch.zeros(2, 2)
    logprobs = torch.tensor([[math.log(1.5), 0.0], [0.0, 5.0]], requires_grad=True)  # (1, 1) is padding
    ref = logprobs.detach() + torch.tensor([[math.log(2.0), 0.0], [0.0, 0.0]])
    advantages = torch.tensor([1.0, -0.5])
    loss, stats = grpo_loss(logprobs, old, ref, advantages, mask, clip_eps=0.2, beta=0.1)
    surrogate = -(1.2 * 1.0 + 1.0 * 1.0 + 1.0 * -0.5) / 3
    k3 = (2.0 - math.log(2.0) - 1.0) / 3
    assert loss.item() == pytest.approx(surrogate + 0.1 * k3, abs=1e-6)
    assert stats["kl"] == pytest.approx(k3, abs=1e-6) and stats["clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # Clipped token: no surrogate gradient, only the KL's d k3 / d logp = 1 - exp(ref - logp) = 1 - 2, / 3 tokens.
    assert logprobs.grad[0, 0].item() == pytest.approx(0.1 * (1 - 2.0) / 3, abs=1e-6)
    assert logprobs.grad[0, 1].item() == pytest.approx(-1.0 / 3, abs=1e-6)  # -A * ratio / 3
    assert logprobs.grad[1, 0].item() == pytest.approx(0.5 / 3, abs=1e-6)
    assert logprobs.grad[1, 1].item() == 0.0  # padding


def test_grpo_loss_without_kl_is_the_clipped_surrogate() -> None:
    mask = torch.ones(2, 3)
    logprobs = torch.randn(2, 3)
    loss, stats = grpo_loss(logprobs, logprobs, logprobs + 1.0, torch.tensor([2.0, -1.0]), mask, 0.2, beta=0.0)
    assert loss.item() == pytest.approx(-(2.0 * 3 - 1.0 * 3) / 6, abs=1e-6)  # on-policy: minus the mean advantage
    assert stats["kl"] > 0  # still measured
