"""Stages that stop early: a plateaued metric ends the reward model's loop and SFT's Trainer, and PPO's
``target_kl`` cuts an update's epochs short. (The rule: tests/test_early_stopping.py; resume after a
stop's progress: tests/test_resume.py.)"""

import json
from pathlib import Path

from stages.io import artifacts
from stages.io.config import load_config
from stages.ppo.recipe import train_ppo
from stages.reward.recipe import train_reward
from stages.sft.recipe import train_sft
from stages.training.runner import execute
from tests.conftest import TINY, train_upstream

SETS = [*TINY, "tracking.backend=none"]


def test_reward_stops_when_pair_accuracy_plateaus(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [*SETS, "reward.max_steps=200", "reward.early_stopping={metric: pair_accuracy, patience: 2, eval_every: 5}"],
    )
    metrics = execute("reward", train_reward, cfg, tmp_path / "reward", {})["metrics"]
    stop = metrics["stopped_at_step"]
    evaluations = metrics["early_stopping"]["evaluations"]
    assert stop is not None and stop < 200, "pair_accuracy on 8 held-out prompts plateaus long before 200 steps"
    assert [step for step, _ in evaluations] == list(range(5, stop + 1, 5))
    best = max(value for _, value in evaluations)
    assert all(value <= best for _, value in evaluations[-2:]) and metrics["early_stopping"]["best"] == best
    assert metrics["stop_reason"].startswith("pair_accuracy did not improve on its best")
    history = json.loads((tmp_path / "reward" / "history.json").read_text())
    assert history[-1]["step"] == stop and history[-1]["eval_pair_accuracy"] == evaluations[-1][1]
    assert artifacts.is_finished(tmp_path / "reward")  # a stopped stage is a finished, cacheable artifact


def test_sft_trainer_stops_on_held_out_loss(tmp_path: Path) -> None:
    # min_delta larger than any change: the first evaluation is the best, the next two end the run.
    cfg = load_config(
        None,
        [
            *SETS,
            "sft.max_steps=40",
            "sft.early_stopping={metric: eval_loss, mode: min, min_delta: 100, patience: 2, eval_every: 3}",
        ],
    )
    metrics = execute("sft", train_sft, cfg, tmp_path / "sft", {})["metrics"]
    assert metrics["stopped_at_step"] == 9 and metrics["early_stopping"]["best_step"] == 3
    losses = [value for _, value in metrics["early_stopping"]["evaluations"]]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)
    assert json.loads((tmp_path / "sft" / "history.json").read_text())[-1]["step"] == 9  # the Trainer stopped there


def test_ppo_target_kl_stops_the_remaining_epochs(tmp_path: Path) -> None:
    inputs = train_upstream(tmp_path / "up", SETS)
    # 2 epochs x 2 minibatches per update.
    base = [*SETS, "ppo.ppo_epochs=2", "ppo.rollout_prompts=4", "ppo.minibatch_size=2", "ppo.checkpoint_every=10"]
    tight = execute("ppo", train_ppo, load_config(None, [*base, "ppo.target_kl=1e-6"]), tmp_path / "tight", inputs)
    loose = execute("ppo", train_ppo, load_config(None, [*base, "ppo.target_kl=100"]), tmp_path / "loose", inputs)
    rows = {name: json.loads((tmp_path / name / "history.json").read_text()) for name in ("tight", "loose")}
    assert [row["minibatches"] for row in rows["loose"]] == [4.0, 4.0]
    # Each update's first minibatch is on-policy (a fresh rollout: approx-KL is float noise between the
    # sampling and training forwards, ~1e-9, where 1.5e-9 was crossed once the rollouts changed); the second
    # is measured after one update (3e-5 to 9e-5 here), above 1.5e-6, so the other two minibatches are skipped.
    assert [row["minibatches"] for row in rows["tight"]] == [2.0, 2.0]
    assert (
        tight["metrics"]["updates_stopped_by_target_kl"] == 2 and loose["metrics"]["updates_stopped_by_target_kl"] == 0
    )


def test_every_rl_stage_stops_early(tmp_path: Path) -> None:
    """RRHF, PPO, GRPO (our loop) and DPO (TRL's Trainer): with ``min_delta`` larger than any change, the
    first evaluation is the best and the second, at step 2 of 3, ends the stage; ``mode`` follows the metric."""
    from stages.dpo.recipe import train_dpo
    from stages.grpo.recipe import train_grpo
    from stages.rrhf.recipe import train_rrhf

    inputs = train_upstream(tmp_path / "up", SETS)
    stop = "{metric: %s, min_delta: 100, patience: 1, eval_every: 1}"
    for stage, train, metric, length in (
        ("rrhf", train_rrhf, "kl_to_reference", "rrhf.max_steps=3"),
        ("ppo", train_ppo, "kl_to_reference", "ppo.updates=3"),
        ("grpo", train_grpo, "policy_reward", "grpo.max_steps=3"),
        ("dpo", train_dpo, "task_score", "dpo.max_steps=3"),
    ):
        cfg = load_config(None, [*SETS, length, f"{stage}.early_stopping={stop % metric}"])
        metrics = execute(stage, train, cfg, tmp_path / stage, inputs)["metrics"]
        assert metrics["stopped_at_step"] == 2 and metrics["early_stopping"]["best_step"] == 1, stage
        assert metrics["early_stopping"]["mode"] == ("min" if metric == "kl_to_reference" else "max"), stage
        history = json.loads((tmp_path / stage / "history.json").read_text())
        assert history[-1]["update" if stage == "ppo" else "step"] == 2, stage
