"""Early stopping: end a stage once a held-out metric stops improving (``<stage>.early_stopping``).

Every ``eval_every`` steps the stage evaluates (its spec's ``stopping_metrics`` list what it can
measure then), and ``EarlyStopper`` keeps the best value: an evaluation improves on it when it is better
by more than ``min_delta`` in the direction of ``mode``; after ``patience`` evaluations in a row without
an improvement the stage stops, as Keras' and the HF Trainer's ``EarlyStoppingCallback`` do. A stopped
stage publishes the weights of its last step (not of its best evaluation) like any finished stage, and
is cached like one; where and why it stopped go into its metrics (``stopped_at_step``, ``stop_reason``,
``early_stopping``), hence its manifest, the report and W&B.

The stopper's state is training state: our loops keep it in their checkpoints (``stages.training.loop``),
the HF Trainer stages beside theirs (``stages.training.hf_trainer.stopping_callback``), so a resumed stage stops exactly where an
uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.io.config import EarlyStoppingSection

Evaluate = Callable[[], dict[str, float]]  # the stage's held-out metrics now


@dataclass
class EarlyStopper:
    """Best-so-far tracking with patience over a stream of evaluations (``update``)."""

    settings: EarlyStoppingSection
    best: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0
    evaluations: list[list[float]] = field(default_factory=list)  # [step, value]
    stopped_at_step: int | None = None

    @property
    def eval_every(self) -> int:
        return self.settings.eval_every

    def update(self, step: int, value: float, last: bool = False) -> bool:
        """Record the evaluation at ``step``; True when the stage should stop now. A non-finite value
        never improves. At the stage's ``last`` step nothing is left to skip: it is recorded, never a stop."""
        s = self.settings
        self.evaluations.append([step, value])
        better = math.isfinite(value) and (
            self.best is None
            or (value > self.best + s.min_delta if s.mode == "max" else value < self.best - s.min_delta)
        )
        if better:
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        if self.bad_evaluations >= s.patience and not last:
            self.stopped_at_step = step
        return self.stopped_at_step is not None

    def reason(self) -> str | None:
        if self.stopped_at_step is None:
            return None
        s = self.settings
        best = "no finite value" if self.best is None else f"its best, {self.best:.4g} at step {self.best_step}"
        return (
            f"{s.metric} did not improve on {best} (by more than min_delta={s.min_delta:g}, mode {s.mode}) "
            f"in {s.patience} evaluation(s), one every {s.eval_every} steps"
        )

    def metrics(self) -> dict[str, Any]:
        """What the stage reports: where and why it stopped, and every evaluation."""
        return {
            "stopped_at_step": self.stopped_at_step,
            "stop_reason": self.reason(),
            "early_stopping": {
                "metric": self.settings.metric,
                "mode": self.settings.mode,
                "best": self.best,
                "best_step": self.best_step,
                "evaluations": self.evaluations,
            },
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
            "evaluations": self.evaluations,
            "stopped_at_step": self.stopped_at_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evaluations, self.evaluations = state["bad_evaluations"], state["evaluations"]
        self.stopped_at_step = state["stopped_at_step"]


def evaluating(model: Any, measure: Evaluate) -> Evaluate:
    """``measure`` run with ``model`` in eval mode (no dropout), and back in train mode after it."""

    def evaluate() -> dict[str, float]:
        model.eval()
        try:
            return measure()
        finally:
            model.train()

    return evaluate


def stopper_for(settings: EarlyStoppingSection | None) -> EarlyStopper | None:
    return EarlyStopper(settings) if settings is not None else None


def not_stopping() -> dict[str, Any]:
    """The metrics of a stage without early stopping (every stage reports the same keys)."""
    return {"stopped_at_step": None, "stop_reason": None, "early_stopping": None}
