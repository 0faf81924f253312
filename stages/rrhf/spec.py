"""The rrhf stage's declaration: RRHF (Yuan et al. 2023). Torch-free: read while the stage table is built.

Its config section (``rrhf:`` in the YAML), its ``StageSpec`` (what it reads and what its result depends
on), the metrics its early stopping may watch, and the memory phases ``rlhf plan`` sizes. The recipe,
``stages/rrhf/recipe.py``, trains it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from stages.io.sections import Launcher, RewardSourceSection
from stages.memory.plan import DataShape, Parallel, Phase, Workload, evaluation_sampling
from stages.registry import GENERATIVE, Curve, StageSpec

if TYPE_CHECKING:
    from stages.io.config import PipelineConfig

GENERATION_BATCH, RANKING_GROUPS = 64, 16


class RRHFSection(RewardSourceSection):
    launcher: Launcher = "local"
    num_prompts: int = Field(default=128, ge=1)  # training prompts to sample candidates for
    num_candidates: int = Field(default=4, ge=1)  # k responses sampled per prompt from the SFT policy
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=16, ge=1)
    # Subtracted from the reward of a candidate that never emitted EOS (it did not answer).
    missing_eos_penalty: float = Field(default=1.0, ge=0)
    max_steps: int = Field(default=120, ge=1)
    batch_size: int = Field(default=4, ge=1)  # prompts per step; each brings its k candidates
    learning_rate: float = Field(default=1e-3, ge=0)  # 0 trains nothing: allowed, warned about
    warmup_steps: int = Field(default=10, ge=0)
    rank_weight: float = Field(default=1.0, ge=0)  # RRHF eq. 4: L = rank_weight * L_rank + L_ft
    logging_steps: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=40, ge=1)  # steps between resumable checkpoints


def memory_workload(cfg: PipelineConfig, data: DataShape, parallel: Parallel) -> Workload:
    """What this stage holds and its phases, for ``rlhf plan`` (``stages.memory.plan``)."""
    rrhf, online = cfg.rrhf, cfg.data.ranked is None
    if online:  # each rank samples candidates for its share of the prompts
        groups, k = -(-min(rrhf.num_prompts, data.prompts) // parallel.world_size), rrhf.num_candidates
        tokens = data.prompt_tokens + rrhf.max_new_tokens
        keep = min(tokens, rrhf.max_new_tokens + 1 + data.prompt_tokens - data.prompt_tokens_min)
    else:
        groups, k, tokens = -(-data.ranked_groups // parallel.world_size), data.ranked_candidates, data.ranked_tokens
        keep = tokens
    rows, ranked = min(rrhf.batch_size, groups) * k, min(RANKING_GROUPS, groups) * k
    phases = [
        Phase("train step", "train", rows, tokens, rows * keep, knobs=("rrhf.batch_size", "rrhf.num_candidates")),
        Phase("ranking accuracy", "forward", ranked, tokens, ranked * keep, knobs=("rrhf.num_candidates",)),
        evaluation_sampling(cfg, data, cfg.eval.max_new_tokens, "eval.max_new_tokens"),
    ]
    if online:  # k candidates per prompt, all scored in one forward (reward_of); the same for evaluation
        candidates = groups * k
        evaluated = min(cfg.eval.num_prompts, data.eval_prompts)
        phases += [
            Phase(
                "candidate sampling",
                "generate",
                min(GENERATION_BATCH, candidates),
                tokens,
                min(GENERATION_BATCH, candidates),
                knobs=("rrhf.num_candidates", "rrhf.max_new_tokens"),
            ),
            Phase(
                "candidate scoring",
                "forward",
                candidates,
                tokens,
                candidates,
                knobs=("rrhf.num_prompts", "rrhf.num_candidates"),
            ),
            Phase(
                "evaluation scoring",
                "forward",
                evaluated,
                data.eval_prompt_tokens + cfg.eval.max_new_tokens,
                evaluated,
                knobs=("eval.num_prompts", "eval.max_new_tokens"),
            ),
        ]
    model_reward = online and "model" in rrhf.reward  # the reward adapter and head, frozen; and the reference
    return Workload("rrhf", 1, 2 if model_reward else 1, tuple(phases), frozen_heads=1 if model_reward else 0)


def check(cfg: PipelineConfig) -> None:
    """RRHF on given rankings (``data.ranked``) has no reward to measure ``policy_reward`` with."""
    stopping = cfg.rrhf.early_stopping
    if stopping is not None and stopping.metric == "policy_reward" and cfg.data.ranked:
        raise ValueError(
            "rrhf.early_stopping.metric: with data.ranked, rrhf trains on given rankings and has "
            "no reward to measure policy_reward with; choose task_score or kl_to_reference"
        )


SPEC = StageSpec(
    "rrhf",
    (*GENERATIVE, "rrhf", "eval"),
    inputs=("sft", "reward"),
    unless_data={"reward": "ranked"},
    reward_source=True,
    datasets=("sft", "eval"),
    optional_datasets=("prompts",),
    samples_while_training=True,
    prefix_min_learning_rate=0.01,
    curves=(Curve("loss", "RRHF loss"),),
    settings="stages.rrhf.spec:RRHFSection",
    order=30,
    stopping_metrics=("task_score", "kl_to_reference", "policy_reward"),
    memory_workload=memory_workload,
    check=check,
)
