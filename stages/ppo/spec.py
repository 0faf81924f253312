"""The ppo stage's declaration: PPO (Schulman et al. 2017; Ziegler et al. 2019). Torch-free: read while the stage table is built.

Its config section (``ppo:`` in the YAML), its ``StageSpec`` (what it reads and what its result depends
on), the metrics its early stopping may watch, and the memory phases ``rlhf plan`` sizes. The recipe,
``stages/ppo/recipe.py``, trains it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from stages.io.sections import Launcher, RewardSourceSection
from stages.memory.plan import DataShape, Parallel, Phase, Workload, evaluation_sampling
from stages.registry import GENERATIVE, Curve, StageSpec

if TYPE_CHECKING:
    from stages.io.config import PipelineConfig

GENERATION_BATCH = 64  # rollout prompts sampled at once (a memory bound, not a hyper-parameter)


class PPOSection(RewardSourceSection):
    launcher: Launcher = "local"
    updates: int = Field(default=40, ge=1)  # rollout + optimisation rounds
    rollout_prompts: int = Field(default=32, ge=1)  # prompts sampled per update
    ppo_epochs: int = Field(default=2, ge=1)  # passes over each rollout
    minibatch_size: int = Field(default=16, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=5e-4, ge=0)  # 0: warned about; policy and value adapters and the value head
    max_grad_norm: float = Field(default=1.0, gt=0)
    clip_range: float = Field(default=0.2, gt=0)  # policy ratio clip (PPO eq. 7)
    clip_range_value: float = Field(default=0.2, gt=0)
    value_coef: float = Field(default=0.5, ge=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    kl_controller: Literal["adaptive", "fixed"] = "adaptive"
    kl_coef: float = Field(default=0.2, gt=0)  # initial (adaptive) or constant (fixed) KL coefficient
    kl_target: float = Field(default=0.5, gt=0)  # adaptive: target KL per response (Ziegler et al. 2019)
    kl_horizon: int = Field(default=200, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    max_new_tokens: int = Field(default=16, ge=1)
    missing_eos_penalty: float = Field(default=1.0, ge=0)
    checkpoint_every: int = Field(default=5, ge=1)  # updates between resumable checkpoints
    # Within an update, stop the remaining PPO epochs once a minibatch's approx-KL to the rollout policy
    # exceeds 1.5 x target_kl (OpenAI Spinning Up, Stable-Baselines3). null: off. Not kl_target, which
    # steers the adaptive KL penalty in the reward.
    target_kl: float | None = Field(default=None, gt=0)
    # separate: a value adapter (from the reward model) + value head. shared: the value head alone, from zero,
    # on the policy adapter's hidden states (detached: the value loss never moves the policy): one forward and
    # backward fewer per minibatch, but the value is a linear read-out of the policy's features.
    value_model: Literal["separate", "shared"] = "separate"


def memory_workload(cfg: PipelineConfig, data: DataShape, parallel: Parallel) -> Workload:
    """What this stage holds and its phases, for ``rlhf plan`` (``stages.memory.plan``)."""
    ppo = cfg.ppo
    rollout = min(ppo.rollout_prompts, data.prompts)
    tokens = data.prompt_tokens + ppo.max_new_tokens
    # token_logprobs computes logits from the first response position of the batch on.
    keep = min(tokens, ppo.max_new_tokens + 1 + data.prompt_tokens - data.prompt_tokens_min)
    minibatch = min(ppo.minibatch_size, rollout)
    evaluated = min(cfg.eval.num_prompts, data.eval_prompts)
    shared = ppo.value_model == "shared"
    phases = (
        Phase(
            "rollout sampling",
            "generate",
            min(GENERATION_BATCH, rollout),
            tokens,
            min(GENERATION_BATCH, rollout),
            knobs=("ppo.rollout_prompts", "ppo.max_new_tokens"),
        ),
        Phase(
            "rollout scoring",
            "forward",
            rollout,
            tokens,
            rollout * keep,
            knobs=("ppo.rollout_prompts", "ppo.max_new_tokens"),
        ),
        # Locally the policy's graph is freed before the value forward; DeepSpeed takes both in one backward.
        # A shared value model has one forward, so one graph, either way.
        Phase(
            "train step",
            "train",
            minibatch,
            tokens,
            minibatch * keep,
            graphs=2 if parallel.launched and not shared else 1,
            knobs=("ppo.minibatch_size", "ppo.max_new_tokens"),
        ),
        evaluation_sampling(cfg, data, cfg.eval.max_new_tokens, "eval.max_new_tokens"),
        Phase(
            "evaluation scoring",
            "forward",
            evaluated,
            data.eval_prompt_tokens + cfg.eval.max_new_tokens,
            evaluated,
            knobs=("eval.num_prompts", "eval.max_new_tokens"),
        ),
    )
    # reference + reward frozen (a checker alone: no reward adapter), policy + value trained (shared: no value
    # adapter); value head trained
    model_reward = "model" in ppo.reward
    return Workload(
        "ppo",
        1 if shared else 2,
        2 if model_reward else 1,
        phases,
        trainable_heads=1,
        frozen_heads=1 if model_reward else 0,
    )


def check(cfg: PipelineConfig) -> None:
    """PEFT's AdaLoRA trains one adapter per model: PPO's separate value adapter would be a second."""
    if cfg.adapter.kind == "adalora" and "ppo" in cfg.run.stages and cfg.ppo.value_model == "separate":
        raise ValueError(
            "adapter.kind=adalora: PPO with ppo.value_model: separate trains two adapters (policy "
            "and value) and PEFT's AdaLoRA trains one per model; set ppo.value_model: shared "
            "(the value head on the policy's states)"
        )


SPEC = StageSpec(
    "ppo",
    (*GENERATIVE, "ppo", "eval"),
    inputs=("sft", "reward"),
    reward_source=True,
    datasets=("sft", "eval"),
    optional_datasets=("prompts",),
    step_key="update",
    samples_while_training=True,
    prefix_min_learning_rate=0.001,
    curves=(
        Curve("score", "PPO reward (mean score of rollouts)"),
        Curve("kl", "PPO KL to reference (per response)"),
        Curve("entropy", "PPO policy entropy"),
        Curve("logprob_gap_max", "PPO log-prob gap, sampling vs training (nats, largest)"),
    ),
    settings="stages.ppo.spec:PPOSection",
    order=40,
    stopping_metrics=("task_score", "kl_to_reference", "policy_reward"),
    memory_workload=memory_workload,
    check=check,
)
