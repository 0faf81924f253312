"""The dpo stage's declaration: DPO (Rafailov et al. 2023). Torch-free: read while the stage table is built.

Its config section (``dpo:`` in the YAML), its ``StageSpec`` (what it reads and what its result depends
on), the metrics its early stopping may watch, and the memory phases ``rlhf plan`` sizes. The recipe,
``stages/dpo/recipe.py``, trains it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

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


class DPOSection(TrainerSection):
    """Direct Preference Optimization (Rafailov et al. 2023) with TRL's DPOTrainer: the policy adapter
    starts from SFT, the reference is a frozen copy of the SFT adapter on the same backbone."""

    launcher: Launcher = "local"
    max_steps: int = Field(default=60, ge=1)
    batch_size: int = Field(default=16, ge=1)  # preference pairs per step
    # On the built-in task, 1e-3 drives the chosen responses' likelihood down with the rejected ones and
    # task_score to 0 (the margin still grows): DPO's known failure when it over-optimises.
    learning_rate: float = Field(default=2e-4, ge=0)  # 0 trains nothing: allowed, warned about
    warmup_steps: int = Field(default=5, ge=0)
    # sigmoid: the DPO paper's loss, beta = the KL penalty's strength. ipo: Azar et al. 2023's squared loss,
    # beta = its regulariser tau.
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = Field(default=0.1, gt=0)
    # Weight of an NLL term on the chosen responses beside the preference loss (RPO: Pang et al. 2024,
    # "Iterative Reasoning Preference Optimization"; Liu et al. 2024; TRL's loss_type "sft"). DPO's margin
    # can grow while the chosen responses' own likelihood falls with the rejected ones (likelihood
    # displacement, Razin et al. 2024): configs/sft-dpo.yaml measures it. 0: plain DPO.
    sft_weight: float = Field(default=0.0, ge=0)
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)  # share of prompts held out for reward_accuracy
    # Held-out pairs reward_accuracy is measured on, drawn reproducibly from the held-out share (0: all of them):
    # a 200k-pair file holds out 20k, which took minutes to score for a 5-step run (issue 31).
    eval_max_pairs: int = Field(default=512, ge=0)
    checkpoint_every: int = Field(default=30, ge=1)  # steps between resumable checkpoints


def memory_workload(cfg: PipelineConfig, data: DataShape, parallel: Parallel) -> Workload:
    """What this stage holds and its phases, for ``rlhf plan`` (``stages.memory.plan``)."""
    rows = 2 * min(cfg.dpo.batch_size, data.pairs)  # chosen and rejected in one forward, policy and reference
    train = Phase(
        "train step",
        "train",
        rows,
        data.pair_tokens,
        min(rows * data.pair_tokens, TRL_TOKEN_CHUNK),
        TRL_VOCAB_CHUNK,
        knobs=("dpo.batch_size",),
    )
    return Workload(
        "dpo", 1, 1, (train, evaluation_sampling(cfg, data, cfg.eval.max_new_tokens, "eval.max_new_tokens"))
    )


SPEC = StageSpec(
    "dpo",
    (*GENERATIVE, "dpo", "eval"),
    inputs=("sft",),
    datasets=("preferences", "eval"),
    prefix_min_learning_rate=0.01,
    import_overhead_mib=520,
    hf_trainer=True,
    curves=(
        Curve("loss", "DPO loss"),
        Curve("rewards/margins", "DPO reward margin (train batches)"),
        Curve("rewards/accuracies", "DPO reward accuracy (train batches)"),
    ),
    settings="stages.dpo.spec:DPOSection",
    order=50,
    stopping_metrics=("task_score", "kl_to_reference"),
    memory_workload=memory_workload,
)
