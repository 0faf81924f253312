"""What each final metric of a stage means and its unit, for the pages and the terminal (``report.html``,
the dashboard, ``rlhf diff``). ``tests/test_samples.py`` checks that every metric each stage reports has
an entry, so a new metric cannot reach a page without its meaning."""

from __future__ import annotations

from typing import NamedTuple


class Meaning(NamedTuple):
    unit: str  # "" for a count or a label
    text: str


SHARE = "share (0-1)"
NATS = "nats"
_COMMON = {
    "adapter_kind": Meaning("", "the adapter trained on the frozen backbone (adapter.kind)"),
    "warnings": Meaning("", "what the stage found wrong while training: a loss that did not fall, frozen weights"),
    "trainable_parameters": Meaning("parameters", "weights the stage trained (its adapters and heads)"),
    "resumed_from_step": Meaning("step", "the checkpoint this stage resumed from (0: it started fresh)"),
    "resumed_from_update": Meaning("update", "the checkpoint PPO resumed from (0: it started fresh)"),
    "stopped_at_step": Meaning("step", "where early stopping ended training (empty: it ran every step)"),
    "stop_reason": Meaning("", "why early stopping ended training"),
    "early_stopping": Meaning("", "the early-stopping metric's best value and where it was reached"),
    "task_score": Meaning(SHARE, "held-out prompts answered exactly and stopped, sampled at eval.temperature"),
    "task_score_before": Meaning(SHARE, "task_score of the base model, before SFT"),
    "task_score_sft": Meaning(SHARE, "task_score of the SFT adapter this stage started from"),
    "kl_to_reference": Meaning(NATS, "KL(policy || SFT reference) per held-out response, summed over its tokens"),
    "policy_reward": Meaning("reward", "mean reward of the policy's held-out responses (the stage's reward source)"),
    "reward_source": Meaning("", "what the stage's reward is: the reward model, a checker, or both"),
    "train_loss": Meaning("loss", "mean training loss over all steps"),
    "final_loss": Meaning("loss", "training loss of the last logged step"),
    "train_pairs": Meaning("pairs", "preference pairs trained on"),
    "eval_pairs": Meaning("pairs", "held-out pairs the accuracy was measured on (eval_max_pairs bounds them)"),
    "held_out_pairs": Meaning("pairs", "held-out pairs available (split by prompt from the training pairs)"),
    "logprob_gap_max": Meaning(NATS, "largest gap between sampling's and training's log-prob of a sampled token"),
    "logprob_gap_mean": Meaning(NATS, "mean gap between sampling's and training's log-probs of sampled tokens"),
}
_BY_STAGE = {
    "sft": {
        "train_seconds": Meaning("s", "time in the training loop (without loading and evaluation)"),
    },
    "reward": {
        "pair_accuracy": Meaning(SHARE, "held-out pairs whose chosen response scores above the rejected one"),
        "reward_margin": Meaning("reward", "mean score of chosen minus rejected, on the held-out pairs"),
    },
    "rrhf": {
        "ranking_accuracy": Meaning(SHARE, "candidate pairs the policy's log-probs rank as the reward does"),
        "ranking_accuracy_before": Meaning(SHARE, "ranking_accuracy of the SFT policy, before RRHF"),
        "candidate_reward": Meaning("reward", "mean reward of the sampled candidates RRHF ranked"),
        "groups": Meaning("groups", "candidate groups (one prompt's ranked responses) trained on"),
    },
    "ppo": {
        "updates": Meaning("updates", "PPO updates run (one rollout and its epochs each)"),
        "final_kl_coef": Meaning("coefficient", "the KL penalty's coefficient at the end (adaptive: kl_controller)"),
        "updates_stopped_by_target_kl": Meaning("updates", "updates whose epochs target_kl cut short"),
    },
    "dpo": {
        "reward_accuracy": Meaning(SHARE, "held-out pairs whose implicit reward ranks chosen above rejected"),
        "reward_margin": Meaning("reward", "mean implicit reward (beta log-ratio) of chosen minus rejected, held out"),
        "dropped_pairs": Meaning("pairs", "pairs dropped: chosen and rejected identical once truncated"),
    },
    "grpo": {
        "steps": Meaning("steps", "GRPO steps run (one group sample and its updates each)"),
    },
}


def meaning(stage: str, metric: str) -> Meaning | None:
    """The unit and meaning of ``stage``'s final metric ``metric``; None for one no entry describes."""
    return _BY_STAGE.get(stage, {}).get(metric) or _COMMON.get(metric)


# The metrics a nightly comparison follows, in this order, where a stage reports them.
KEY_METRICS = (
    "task_score",
    "pair_accuracy",
    "reward_accuracy",
    "ranking_accuracy",
    "policy_reward",
    "kl_to_reference",
    "reward_margin",
    "final_loss",
)
