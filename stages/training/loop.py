"""The resumable training loop of our own stages (reward, RRHF, PPO, and the stages to come).

A recipe gives one function, ``train_step(step, log) -> row | None``, and the loop does the rest:

* resume from the newest checkpoint of the same cache key (adapters, heads, updater, every rank's
  CPU and CUDA torch generators and the loop's *samplers*, the objects that draw its batches), so the
  batches and dropout masks after a resume are exactly those an uninterrupted run draws;
* a progress bar (``stages.io.progress``), starting at the resumed step;
* the history: at every ``log_every`` steps and at the last, ``train_step`` returns a row of metrics
  (every rank computes it: its values may be reduced over ranks), and the loop adds the step and the
  learning rate the update really used;
* the sample tables (``stages.io.samples``): at every ``samples_every``-th step that is logged, the
  recipe's ``samples(step)`` rows (held-out prompts and what the policy says to them), kept with the
  history; not after the last step, whose table is the final evaluation's;
* a checkpoint every ``checkpoint_every`` steps, with the history, the samples and the recipe's own state;
* early stopping (``stages.training.early_stopping``): every ``eval_every`` steps the recipe's
  ``evaluate`` runs, and the loop ends once the metric has stopped improving; the stopper's state is in
  every checkpoint.

SFT is the exception: TRL's SFTTrainer brings its own loop and checkpoints (``stages.sft.recipe``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stages.io.progress import progress
from stages.training.checkpoints import Checkpointer, Sampler
from stages.training.early_stopping import EarlyStopper, Evaluate, not_stopping

Row = dict[str, Any]
TrainStep = Callable[[int, bool], "Row | None"]  # (1-based step, log this step?) -> history row
Samples = Callable[[int], list[Row]]  # step -> the sample table's rows after it


class TrainingLoop:
    """Steps ``start + 1 .. total`` of one stage, resumable; see the module docstring.

    ``samplers`` draw the batches (torch.Generator, random.Random, or objects with ``state_dict``):
    they are restored by ``resume`` and saved, per rank, with every checkpoint.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        *,
        desc: str,
        total: int,
        log_every: int,
        checkpoint_every: int,
        samplers: dict[str, Sampler] | None = None,
        step_key: str = "step",
        stopper: EarlyStopper | None = None,
        evaluate: Evaluate | None = None,
        samples: Samples | None = None,
        samples_every: int = 1,
    ) -> None:
        self.checkpointer, self.desc, self.total = checkpointer, desc, total
        self.log_every, self.checkpoint_every, self.step_key = log_every, checkpoint_every, step_key
        self.samplers = samplers or {}
        if stopper is not None and evaluate is None:
            raise ValueError("early stopping needs the stage's evaluate function")
        self.stopper, self.evaluate = stopper, evaluate
        self.start = 0  # steps done before this process: the resumed checkpoint's
        self.last_step = 0  # the last step trained (below total after an early stop)
        self.history: list[Row] = []
        self.sample_fn, self.samples_every = samples, samples_every
        self.samples: list[Row] = []  # every step table's rows, oldest first

    def resume(self) -> dict[str, Any] | None:
        """Restore the newest checkpoint, if any; return the recipe's saved state (None: a fresh start)."""
        state = self.checkpointer.resume(self.samplers)
        if state is not None:
            self.start, self.history = state["step"], state["history"]
            self.samples = state.get("samples", [])
            self.last_step = self.start
            if self.stopper is not None:
                self.stopper.load_state_dict(state["early_stopping"])
        return state

    def run(self, train_step: TrainStep, saved_state: Callable[[], dict[str, Any]] = dict) -> list[Row]:
        """Run the remaining steps; return the whole history (the resumed part included).

        ``saved_state()`` is what the recipe keeps in each checkpoint besides the history (JSON).
        """
        updater = self.checkpointer.updater
        for step in progress(
            range(self.start + 1, self.total + 1),
            desc=self.desc,
            unit=self.step_key,
            initial=self.start,
            total=self.total,
        ):
            log = step % self.log_every == 0 or step == self.total
            row = train_step(step, log)
            if log and row is not None:
                self.history.append({self.step_key: step, **row, "learning_rate": updater.applied_lr})
            self.last_step = step
            if self._should_stop(step):
                break  # the artifact follows at once: no checkpoint
            logged = step // self.log_every  # the logged steps so far: tables come every samples_every of them
            if log and self.sample_fn is not None and logged % self.samples_every == 0 and step < self.total:
                self.samples += self.sample_fn(step)
            stopping = {"early_stopping": self.stopper.state_dict()} if self.stopper is not None else {}
            self.checkpointer.maybe_save(
                step,
                self.checkpoint_every,
                self.total,
                {"history": self.history, "samples": self.samples, **stopping, **saved_state()},
                self.samplers,
            )
        return self.history

    def _should_stop(self, step: int) -> bool:
        """Evaluate at every ``eval_every`` steps (after the step's update); the value joins the step's
        history row (``eval_<metric>``) when it has one."""
        if self.stopper is None or step % self.stopper.eval_every:
            return False
        metric = self.stopper.settings.metric
        value = self.evaluate()[metric]
        if self.history and self.history[-1][self.step_key] == step:
            self.history[-1][f"eval_{metric}"] = value
        return self.stopper.update(step, value, last=step == self.total)

    def stopping_metrics(self) -> dict[str, Any]:
        """``EarlyStopper.metrics`` (or the same keys, empty, without early stopping)."""
        return self.stopper.metrics() if self.stopper is not None else not_stopping()
