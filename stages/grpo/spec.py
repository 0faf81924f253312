"""The grpo stage's declaration: GRPO (Shao et al. 2024). Torch-free: read while the stage table is built.

Its config section (``grpo:`` in the YAML), its ``StageSpec`` (what it reads and what its result depends
on), the metrics its early stopping may watch, and the memory phases ``rlhf plan`` sizes. The recipe,
``stages/grpo/recipe.py``, trains it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from stages.io.sections import Launcher, RewardSourceSection
from stages.memory.plan import DataShape, Parallel, Phase, Workload, evaluation_sampling
from stages.registry import GENERATIVE, Curve, StageSpec

if TYPE_CHECKING:
    from stages.io.config import PipelineConfig

GENERATION_BATCH = 64  # responses sampled at once (a memory bound, not a hyper-parameter)


class GRPOSection(RewardSourceSection):
    """GRPO (Shao et al. 2024): G responses per prompt from the policy adapter, group-relative advantages,
    a clipped policy loss and a KL term to the frozen SFT adapter; no value model."""

    launcher: Launcher = "local"
    max_steps: int = Field(default=40, ge=1)  # sample + optimise rounds
    prompts_per_step: int = Field(default=8, ge=1)
    num_generations: int = Field(default=4, ge=2)  # G: responses per prompt (a group)
    num_iterations: int = Field(default=1, ge=1)  # passes over each step's samples (the paper's mu)
    minibatch_size: int = Field(default=16, ge=1)  # responses per optimizer update
    learning_rate: float = Field(default=5e-4, ge=0)  # 0 trains nothing: allowed, warned about
    max_grad_norm: float = Field(default=1.0, gt=0)
    clip_range: float = Field(default=0.2, gt=0)  # policy ratio clip (the paper's epsilon)
    beta: float = Field(default=0.04, ge=0)  # weight of the KL to the SFT reference; 0 turns it off
    # Divide advantages by the group's reward std (GRPO) or not (the default, Dr. GRPO's advantage; the loss
    # stays a token mean over the batch, DAPO's aggregation, not Dr. GRPO's constant divisor): with a reward model, the
    # std of a group whose responses all stop is RM noise (~0.002), and dividing by it made that noise the signal:
    # task_score 0.750 -> 0.453 at KL 4.3 (false: 1.000 at KL 0.32; beta=0.2 with it: 0.938).
    scale_rewards: bool = False
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=16, ge=1)
    missing_eos_penalty: float = Field(default=1.0, ge=0)  # subtracted from a response that never stopped
    checkpoint_every: int = Field(default=10, ge=1)  # steps between resumable checkpoints


def memory_workload(cfg: PipelineConfig, data: DataShape, parallel: Parallel) -> Workload:
    """What this stage holds and its phases, for ``rlhf plan`` (``stages.memory.plan``)."""
    grpo = cfg.grpo
    responses = (
        -(-min(grpo.prompts_per_step * parallel.world_size, data.prompts) // parallel.world_size) * grpo.num_generations
    )
    tokens = data.prompt_tokens + grpo.max_new_tokens
    keep = min(tokens, grpo.max_new_tokens + 1 + data.prompt_tokens - data.prompt_tokens_min)
    minibatch = min(grpo.minibatch_size, responses)
    model_reward = "model" in grpo.reward
    phases = (
        Phase(
            "group sampling",
            "generate",
            min(GENERATION_BATCH, responses),
            tokens,
            min(GENERATION_BATCH, responses),
            knobs=("grpo.prompts_per_step", "grpo.num_generations", "grpo.max_new_tokens"),
        ),
        Phase(
            "reference scoring",
            "forward",
            responses,
            tokens,
            responses * keep,
            knobs=("grpo.prompts_per_step", "grpo.num_generations"),
        ),
        Phase("train step", "train", minibatch, tokens, minibatch * keep, knobs=("grpo.minibatch_size",)),
        evaluation_sampling(cfg, data, cfg.eval.max_new_tokens, "eval.max_new_tokens"),
    )
    # policy trained; reference (and the reward model) frozen
    return Workload("grpo", 1, 2 if model_reward else 1, phases, frozen_heads=1 if model_reward else 0)


SPEC = StageSpec(
    "grpo",
    (*GENERATIVE, "grpo", "eval"),
    inputs=("sft", "reward"),
    reward_source=True,
    datasets=("sft", "eval"),
    optional_datasets=("prompts",),
    samples_while_training=True,
    prefix_min_learning_rate=0.001,
    curves=(
        Curve("reward", "GRPO reward (mean of the sampled groups)"),
        Curve("kl", "GRPO KL to reference (k3, per token)"),
        Curve("reward_std", "GRPO reward std within groups"),
        Curve("logprob_gap_max", "GRPO log-prob gap, sampling vs training (nats, largest)"),
    ),
    settings="stages.grpo.spec:GRPOSection",
    order=60,
    stopping_metrics=("task_score", "kl_to_reference", "policy_reward"),
    memory_workload=memory_workload,
)
