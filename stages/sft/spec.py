"""The sft stage's declaration: Supervised fine-tuning (SFT). Torch-free: read while the stage table is built.

Its config section (``sft:`` in the YAML), its ``StageSpec`` (what it reads and what its result depends
on), the metrics its early stopping may watch, and the memory phases ``rlhf plan`` sizes. The recipe,
``stages/sft/recipe.py``, trains it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from stages.io.sections import Launcher, TrainerSection
from stages.memory.plan import (
    TRL_TOKEN_CHUNK,
    TRL_VOCAB_CHUNK,
    DataShape,
    Parallel,
    Phase,
    Workload,
    evaluation_sampling,
)
from stages.registry import GENERATIVE, Curve, StageSpec

if TYPE_CHECKING:
    from stages.io.config import PipelineConfig


class SFTSection(TrainerSection):
    launcher: Launcher = "local"
    max_steps: int = Field(default=150, ge=1)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=2e-3, ge=0)  # 0 trains nothing: allowed, warned about
    warmup_steps: int = Field(default=10, ge=0)
    max_length: int = Field(default=64, ge=8)
    # TRL's best-fit-decreasing packing: whole demonstrations packed into rows of at most max_length ids and
    # trained padding-free (each keeps its own positions and attention, no loss across a boundary). README,
    # "Packing": what it does to the loss mask, the batches and resume.
    packing: bool = False


def memory_workload(cfg: PipelineConfig, data: DataShape, parallel: Parallel) -> Workload:
    """What this stage holds and its phases, for ``rlhf plan`` (``stages.memory.plan``)."""
    rows = min(cfg.sft.batch_size, data.demos)  # the data loader's last batch is never larger than the data
    tokens = min(cfg.sft.max_length, data.demo_tokens)  # TRL truncates at max_length, pads to the longest row
    if cfg.sft.packing:  # padding-free: the batch's packed rows are one sequence of up to batch x max_length ids
        rows, tokens = 1, rows * cfg.sft.max_length
    train = Phase(
        "train step",
        "train",
        rows,
        tokens,
        min(rows * tokens, TRL_TOKEN_CHUNK),
        TRL_VOCAB_CHUNK,
        knobs=("sft.batch_size", "sft.max_length"),
    )
    return Workload(
        "sft", 1, 0, (train, evaluation_sampling(cfg, data, cfg.eval.max_new_tokens, "eval.max_new_tokens"))
    )


SPEC = StageSpec(
    "sft",
    (*GENERATIVE, "sft", "eval"),
    datasets=("sft", "eval"),
    prefix_min_learning_rate=0.05,
    import_overhead_mib=520,
    curves=(Curve("loss", "SFT loss"),),
    hf_trainer=True,
    settings="stages.sft.spec:SFTSection",
    order=10,
    stopping_metrics=("task_score", "eval_loss"),
    memory_workload=memory_workload,
)
