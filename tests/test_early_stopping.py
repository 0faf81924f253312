"""Early stopping's rule (``EarlyStopper``) and its config. The stages' stops: tests/test_reward_rrhf.py,
tests/test_ppo.py (target_kl), tests/test_learning_per_kind.py (SFT, DPO); resumes: tests/test_resume.py."""

import math

import pytest

from stages.io.config import ConfigError, EarlyStoppingSection, load_config
from stages.training.early_stopping import EarlyStopper


def _run(stopper: EarlyStopper, values: list[float]) -> int | None:
    for i, value in enumerate(values, start=1):
        if stopper.update(i * stopper.eval_every, value):
            return i * stopper.eval_every
    return None


def test_stops_after_patience_evaluations_without_improvement() -> None:
    stopper = EarlyStopper(EarlyStoppingSection(metric="task_score", patience=2, eval_every=5))
    assert _run(stopper, [0.5, 0.7, 0.7, 0.69, 0.9]) == 20  # best 0.7 at 10; 15 and 20 do not beat it
    assert (stopper.best, stopper.best_step, stopper.stopped_at_step) == (0.7, 10, 20)
    assert stopper.reason() == (
        "task_score did not improve on its best, 0.7 at step 10 (by more than min_delta=0, "
        "mode max) in 2 evaluation(s), one every 5 steps"
    )
    assert stopper.metrics()["early_stopping"]["evaluations"] == [[5, 0.5], [10, 0.7], [15, 0.7], [20, 0.69]]


def test_min_mode_and_min_delta_count_only_real_improvements() -> None:
    stopper = EarlyStopper(
        EarlyStoppingSection(metric="eval_loss", mode="min", min_delta=0.1, patience=2, eval_every=1)
    )
    # 1.95 beats 2.0 by less than min_delta: not an improvement; 1.5 is; then two that are not.
    assert _run(stopper, [2.0, 1.95, 1.5, 1.45, 1.41, 1.0]) == 5
    assert (stopper.best, stopper.best_step) == (1.5, 3)


def test_an_improving_metric_never_stops_and_nan_never_improves() -> None:
    assert (
        _run(EarlyStopper(EarlyStoppingSection(metric="task_score", patience=1, eval_every=1)), [0.1, 0.2, 0.3, 0.4])
        is None
    )
    stopper = EarlyStopper(EarlyStoppingSection(metric="eval_loss", mode="min", patience=2, eval_every=1))
    assert _run(stopper, [math.nan, math.inf]) == 2 and stopper.best is None
    assert "no finite value" in stopper.reason()


def test_state_round_trip_resumes_the_same_decision() -> None:
    settings = EarlyStoppingSection(metric="task_score", patience=3, eval_every=1)
    straight, first = EarlyStopper(settings), EarlyStopper(settings)
    values = [0.2, 0.6, 0.5, 0.55, 0.4, 0.1]
    expected = _run(straight, values)
    for i, value in enumerate(values[:3], start=1):
        first.update(i, value)
    resumed = EarlyStopper(settings)
    resumed.load_state_dict(first.state_dict())
    stop = next(i for i, v in enumerate(values[3:], start=4) if resumed.update(i, v))
    assert stop == expected == 5 and resumed.metrics() == straight.metrics()


def test_off_by_default_and_a_metric_the_stage_cannot_measure_is_refused() -> None:
    cfg = load_config()
    assert all(getattr(cfg, s).early_stopping is None for s in ("sft", "reward", "rrhf", "ppo", "dpo", "grpo"))
    assert cfg.ppo.target_kl is None
    with pytest.raises(
        ConfigError,
        match="reward.early_stopping.metric: reward cannot evaluate 'task_score' while it "
        "trains; choose one of pair_accuracy, reward_margin",
    ):
        load_config(None, ["reward.early_stopping={metric: task_score}"])
    with pytest.raises(ConfigError, match="sft.early_stopping.patience: Input should be greater than or equal to 1"):
        load_config(None, ["sft.early_stopping={metric: eval_loss, patience: 0}"])
    with pytest.raises(ConfigError, match="with data.ranked, rrhf trains on given rankings and has no reward"):
        load_config(
            None, ["run.stages=[sft,rrhf]", "data.ranked=builtin", "rrhf.early_stopping={metric: policy_reward}"]
        )
    load_config(None, ["run.stages=[sft,rrhf]", "data.ranked=builtin", "rrhf.early_stopping={metric: task_score}"])
    with pytest.raises(ConfigError, match="adapter.kind=adalora: reward allocate AdaLoRA's ranks on a schedule"):
        load_config(
            None, ["adapter.kind=adalora", "ppo.value_model=shared", "reward.early_stopping={metric: pair_accuracy}"]
        )
    load_config(None, ["adapter.kind=adalora", "ppo.value_model=shared", "ppo.early_stopping={metric: task_score}"])


def test_mode_follows_the_metric_unless_given_and_the_last_step_is_never_a_stop() -> None:
    assert EarlyStoppingSection(metric="eval_loss").mode == "min"
    assert EarlyStoppingSection(metric="kl_to_reference").mode == "min"
    assert EarlyStoppingSection(metric="task_score").mode == "max"
    assert EarlyStoppingSection(metric="eval_loss", mode="max").mode == "max"
    stopper = EarlyStopper(EarlyStoppingSection(metric="eval_loss", patience=1, eval_every=1))
    assert not stopper.update(1, 2.0) and not stopper.update(2, 1.5)  # a falling loss improves
    assert not stopper.update(3, 1.6, last=True)  # no improvement, but nothing is left to skip
    assert stopper.stopped_at_step is None and stopper.reason() is None


def test_the_trainer_callback_saves_no_checkpoint_at_its_stop() -> None:
    """A checkpoint at the stop step would resume past the stop (the Trainer trains at least one step
    after a resume); without one, a resume replays from the checkpoint before and stops at the same step."""
    from transformers import TrainerControl, TrainerState

    from stages.training.hf_trainer import stopping_callback

    stopper = EarlyStopper(EarlyStoppingSection(metric="eval_loss", patience=1, eval_every=5))
    callback = stopping_callback(stopper, lambda: {"eval_loss": 1.0})
    state, control = TrainerState(global_step=5, max_steps=100), TrainerControl()
    callback.on_step_end(None, state, control)  # the first evaluation: the best so far
    assert not control.should_training_stop
    state.global_step, control.should_save = 10, True  # a save step too (the flow callback set it)
    callback.on_step_end(None, state, control)
    assert control.should_training_stop and not control.should_save and stopper.stopped_at_step == 10


def test_target_kl_stops_above_one_and_a_half_times_the_target_and_only_after_an_update() -> None:
    """Spinning Up's and SB3's rule: stop the update's remaining epochs once approx-KL > 1.5 x target_kl."""
    import torch

    from stages.ppo.recipe import _over_target_kl
    from stages.ppo.spec import PPOSection
    from stages.training.distributed import LOCAL
    from stages.training.updater import Updater

    ppo = PPOSection(target_kl=0.02)
    updater = Updater(torch.nn.Linear(2, 1), 0.1, warmup_steps=0, total_steps=4, gradient_accumulation=2)
    assert not _over_target_kl(0.029, updater, ppo, LOCAL)  # above 1x (and 1.4x) the target: goes on
    assert _over_target_kl(0.031, updater, ppo, LOCAL)  # above 1.5x
    updater.micro_steps = 1  # half of an accumulated update pending: never stop between its micro-batches
    assert not _over_target_kl(0.5, updater, ppo, LOCAL)
    assert not _over_target_kl(0.5, Updater(torch.nn.Linear(2, 1), 0.1, 0, 4), PPOSection(), LOCAL)  # off by default
