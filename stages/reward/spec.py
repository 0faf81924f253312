"""The reward stage's declaration: Reward modelling. Torch-free: read while the stage table is built.

Its config section (``reward:`` in the YAML), its ``StageSpec`` (what it reads and what its result depends
on), the metrics its early stopping may watch, and the memory phases ``rlhf plan`` sizes. The recipe,
``stages/reward/recipe.py``, trains it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from stages.io.sections import Launcher, StoppableSection
from stages.memory.plan import DataShape, Parallel, Phase, Workload
from stages.registry import GENERATIVE, Curve, StageSpec

if TYPE_CHECKING:
    from stages.io.config import PipelineConfig

EVAL_PAIRS = 64  # held-out pairs scored at once (a memory bound, not a hyper-parameter)


class RewardSection(StoppableSection):
    launcher: Launcher = "local"
    max_steps: int = Field(default=150, ge=1)
    batch_size: int = Field(default=16, ge=1)  # preference pairs per step
    learning_rate: float = Field(default=2e-3, ge=0)  # 0 trains nothing: allowed, warned about
    warmup_steps: int = Field(default=10, ge=0)
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)  # share of prompts held out for pair_accuracy
    # Held-out pairs pair_accuracy is measured on, drawn reproducibly from the held-out share (0: all of them):
    # a 200k-pair file holds out 20k, which took minutes to score for a 5-step run (issue 31).
    eval_max_pairs: int = Field(default=512, ge=0)
    logging_steps: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)  # steps between resumable checkpoints


def memory_workload(cfg: PipelineConfig, data: DataShape, parallel: Parallel) -> Workload:
    """What this stage holds and its phases, for ``rlhf plan`` (``stages.memory.plan``)."""
    rows = 2 * min(cfg.reward.batch_size, data.pairs)  # chosen and rejected in one forward
    train = Phase("train step", "train", rows, data.pair_tokens, rows, knobs=("reward.batch_size",))
    held = 2 * min(EVAL_PAIRS, data.pairs)
    scoring = Phase("held-out scoring", "forward", held, data.pair_tokens, held)
    return Workload("reward", 1, 0, (train, scoring), trainable_heads=1)


SPEC = StageSpec(
    "reward",
    (*GENERATIVE, "reward"),
    datasets=("preferences",),
    prefix_min_learning_rate=0.01,
    curves=(Curve("accuracy", "reward model accuracy (train batches)"), Curve("loss", "reward model loss")),
    settings="stages.reward.spec:RewardSection",
    order=20,
    stopping_metrics=("pair_accuracy", "reward_margin"),
    memory_workload=memory_workload,
)
