"""Loss functions for the RLHF stages: reward modelling, PPO, RRHF and GRPO.

All functions are pure: they take tensors and hyper-parameters and return
tensors (plus, for the training losses, a dict of float statistics). Masks are
0/1 float or bool tensors marking the valid (response) tokens; positions
outside the mask never contribute to a loss and are zeroed in tensor outputs.

Shape legend: B = batch, T = response length, K = candidates per prompt, G = responses per prompt (GRPO).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # torch is imported where it runs, so a recipe's import (and ``rlhf plan``) stays light
    from torch import Tensor

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "pairwise_reward_loss",
    "kl_penalized_rewards",
    "gae_advantages",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rrhf_loss",
    "group_advantages",
    "grpo_loss",
]


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1.

    With ``dim=None`` the mean is over all elements (scalar); otherwise over
    ``dim``. Empty selections return 0 instead of NaN (count clamped to 1).
    """
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of ``values`` over the mask (Bessel-corrected by default)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        # n / (n - 1) correction; clamp keeps a single valid element finite.
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(
    values: Tensor, mask: Tensor, shift_mean: bool = True, total: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Normalise ``values`` to unit (unbiased, masked) variance.

    With ``shift_mean=False`` the original mean is kept, which is what PPO
    reward whitening wants (the sign of the reward carries information).
    Off-mask positions are set to 0 so padding never leaks downstream.
    ``total`` sums a scalar over every rank of a distributed job (default: this process only), so each
    rank whitens its share of a global batch with the global batch's mean and variance.
    """
    total = total or (lambda t: t)
    mask = mask.to(values.dtype)
    count = total(mask.sum())
    mean = total((values * mask).sum()) / count.clamp(min=1)
    var = total(((values - mean) ** 2 * mask).sum()) / count.clamp(min=1)
    var = var * count / (count - 1).clamp(min=1)  # Bessel, as masked_var
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def pairwise_reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
) -> Tensor:
    """Bradley-Terry pairwise loss, InstructGPT (Ouyang et al. 2022) eq. 1.

    ``loss = -mean(log sigmoid(r_chosen - r_rejected - margin))``; the optional
    margin (Llama-2 style) demands a larger gap for more confident labels.
    Inputs are (B,) scalar rewards; returns a scalar.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff = diff - margin
    # logsigmoid is the numerically stable form of log(sigmoid(x)).
    return -F.logsigmoid(diff).mean()


def _last_valid_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the last 1 in each row of a (B, T) mask, and whether one exists."""
    T = mask.shape[-1]
    positions = torch.arange(1, T + 1, device=mask.device)  # (T,)
    # Weighting by 1..T makes argmax land on the last valid token, which also
    # works for left-padded or non-prefix masks.
    weighted = mask.to(torch.long) * positions  # (B, T)
    last = weighted.argmax(dim=-1)  # (B,)
    has_any = weighted.amax(dim=-1) > 0  # (B,)
    return last, has_any


def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards with a KL penalty to the reference policy.

    Ziegler et al. 2019 sec 2.2 / InstructGPT eq. 2:
    ``r_t = -beta * (log pi(a_t) - log pi_ref(a_t))`` on every response token,
    plus the sequence-level reward-model ``score`` on the last valid token
    (the RM only judges the full response). Rows with no valid token get
    nothing.

    Args: scores (B,), logprobs / ref_logprobs / mask (B, T).
    Returns: ``(rewards, kl)``, both (B, T) and zero off-mask.
    """
    mask_f = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask_f  # (B, T), k1 estimator per token
    rewards = -kl_coef * kl  # (B, T)
    last, has_any = _last_valid_index(mask)  # (B,), (B,)
    bonus = torch.where(has_any, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    # Out-of-place scatter keeps autograd happy if inputs require grad.
    rewards = rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
    return rewards, kl


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation, Schulman et al. 2016 eq. 16.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``;
    ``A_t = sum_l (gamma * lam)^l * delta_{t+l}``, computed backwards over T.
    Values past the last valid token are treated as 0 (episode terminal).
    Advantages are not whitened here; ``returns = advantages + values``.

    Args: rewards, values, mask all (B, T).
    Returns: ``(advantages, returns)``, (B, T), zero off-mask.
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f  # (B, T) zero => bootstrap value 0 after the end
    rewards = rewards * mask_f  # (B, T)
    T = rewards.shape[-1]
    last_gae = torch.zeros_like(values[:, 0])  # (B,)
    reversed_adv: list[Tensor] = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        last_gae = delta + gamma * lam * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1)  # (B, T)
    returns = advantages + values  # (B, T) lambda-returns, value-head targets
    return advantages * mask_f, returns * mask_f


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate, Schulman et al. 2017 eq. 7 (negated to minimise).

    ``L = -E[min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)]``, rho = pi / pi_old,
    averaged over valid tokens (all inputs (B, T)).

    Stats:
      * ``clipfrac``: fraction of tokens where the clipped term is the active
        (larger) loss, i.e. tokens whose gradient is zeroed by clipping.
      * ``approx_kl``: k3 estimator ``(rho - 1) - log rho`` of KL(pi_old || pi),
        unbiased and always >= 0.
      * ``ratio_mean``: masked mean of rho.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_unclipped = -advantages * ratio  # (B, T)
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # max of the negated terms == min of the surrogate objectives (pessimistic bound).
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss (PPO2 / OpenAI baselines variant of eq. 9's L^VF).

    ``0.5 * E[max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)]``
    over valid tokens; clipping stops the value head from moving far from the
    rollout-time estimate in one update. Inputs are (B, T).
    Stats: ``vf_clipfrac`` = fraction of tokens where the clipped error wins.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_unclipped = (values - returns) ** 2  # (B, T)
    err_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((err_clipped > err_unclipped).to(values.dtype), mask).item()
    return loss, {"vf_clipfrac": vf_clipfrac}


def rrhf_loss(
    seq_logprobs: Tensor,
    rewards: Tensor,
    group_mask: Tensor,
    sft_nll: Tensor,
    rank_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """RRHF ranking + SFT loss, Yuan et al. 2023 eq. 2-4.

    Per group (prompt) with candidates i: ``L_rank = sum_{r_i < r_j}
    max(0, p_i - p_j)`` (eq. 2; strict, so ties are ignored), with p the
    length-normalised log-prob (eq. 1); ``L_ft`` = NLL of the highest-reward
    valid candidate (eq. 3, first one on ties); ``L = rank_weight * L_rank + L_ft``
    (eq. 4; the paper's weight is 1),
    averaged over groups with at least one valid candidate.

    Args: seq_logprobs, rewards, group_mask, sft_nll all (B, K); sft_nll is
      the per-candidate length-normalised NLL. Padding candidates may hold
      any finite or non-finite value; they are excluded via ``torch.where``.
    Returns: ``(loss, {"rank_loss", "sft_loss"})``.
    """
    valid = group_mask.to(torch.bool)  # (B, K)
    p_i = seq_logprobs.unsqueeze(2)  # (B, K, 1)
    p_j = seq_logprobs.unsqueeze(1)  # (B, 1, K)
    worse = rewards.unsqueeze(2) < rewards.unsqueeze(1)  # (B, K, K): r_i < r_j
    pair_ok = worse & valid.unsqueeze(2) & valid.unsqueeze(1)  # (B, K, K)
    # where (not multiply) so -inf/NaN in padding cannot poison the sum.
    hinge = torch.where(pair_ok, torch.relu(p_i - p_j), torch.zeros_like(p_i - p_j))
    rank = hinge.sum(dim=(1, 2))  # (B,)

    masked_rewards = rewards.masked_fill(~valid, float("-inf"))  # (B, K)
    best = masked_rewards.argmax(dim=1, keepdim=True)  # (B, 1)
    sft = sft_nll.gather(1, best).squeeze(1)  # (B,)

    group_ok = valid.any(dim=1)  # (B,)
    n_groups = group_ok.sum().clamp(min=1).to(seq_logprobs.dtype)
    rank = torch.where(group_ok, rank, torch.zeros_like(rank))
    sft = torch.where(group_ok, sft, torch.zeros_like(sft))
    rank_loss = rank.sum() / n_groups
    sft_loss = sft.sum() / n_groups
    stats = {"rank_loss": rank_loss.item(), "sft_loss": sft_loss.item()}
    return rank_weight * rank_loss + sft_loss, stats


def group_advantages(rewards: Tensor, scale: bool, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantages, Shao et al. 2024 (DeepSeekMath) sec. 4.1.2: each response's
    reward minus the mean reward of its prompt's group, divided by the group's std when ``scale``.

    ``rewards`` (B, G): G responses to each of B prompts. Returns (B, G). ``scale=False`` drops the std
    division (as Dr. GRPO, Liu et al. 2025, does): it up-weights groups whose rewards barely differ (too
    easy or too hard prompts). The std is the unbiased one (torch's default, as TRL's GRPO). A group whose
    rewards are tied (``tied_groups``) has advantage exactly 0: float32's mean of G equal rewards of 960.67
    is an ulp off them, which the std division turned into advantages up to 0.53 (NeMo-RL PR #4161).
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    advantages = centred / (rewards.std(dim=1, keepdim=True) + eps) if scale else centred
    return advantages.masked_fill(tied_groups(rewards)[:, None], 0.0)


def tied_groups(rewards: Tensor, rtol: float = 1e-5) -> Tensor:
    """(B,) bool: the groups of ``rewards`` (B, G) whose rewards are equal within ``rtol`` of their scale
    (the largest |reward| of the group): the range of a float32 reward computed twice (batch position,
    kernels) is a few ulps, about 1e-7 relative; 1e-5 leaves a hundredfold margin."""
    spread = rewards.amax(dim=1) - rewards.amin(dim=1)
    return spread <= rtol * rewards.abs().amax(dim=1)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    beta: float,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO's objective, Shao et al. 2024 eq. 3 (negated to minimise): PPO's clipped surrogate with each
    response's advantage on every one of its tokens, plus ``beta`` times the per-token KL to the reference,
    estimated with k3 = ``exp(ref - logp) - (ref - logp) - 1`` (eq. 4; always >= 0, and unbiased for
    tokens sampled from the current policy: the first pass over fresh samples).

    ``logprobs``, ``old_logprobs`` (sampling time), ``ref_logprobs`` and ``mask`` are (N, T) for N
    responses; ``advantages`` is (N,) (``group_advantages`` flattened). The mean is over all valid tokens
    of the batch (DAPO's token-level normalisation, TRL's default), not per response first: a long
    response is not down-weighted. ``beta=0`` drops the KL term from the loss (it is still measured).

    Stats: ``clipfrac``, ``approx_kl`` (old vs new, as PPO), ``kl`` (mean k3 to the reference per token).
    """
    per_token_advantages = advantages[:, None].expand_as(logprobs)  # (N, T)
    surrogate, stats = ppo_policy_loss(logprobs, old_logprobs, per_token_advantages, mask, clip_eps)
    log_ref_ratio = ref_logprobs - logprobs  # (N, T)
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0  # (N, T)
    kl = masked_mean(k3, mask)
    loss = surrogate + beta * kl if beta > 0 else surrogate
    return loss, {**stats, "kl": kl.item()}
