"""PPO's models and rollouts: the four adapters and two heads on one backbone (``build_models``), and one
update's samples, scored and shaped (``collect_rollout``: sample with the policy, then reference
log-probs, reward, values and the KL-shaped, GAE-whitened advantages). ``stages/ppo/recipe.py`` trains
on them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stages.io.config import PipelineConfig
from stages.io.formats import Prompt
from stages.model.adapters import active_adapter, load_adapter, set_trainable
from stages.model.backbone import stage_backbone
from stages.model.generation import generate
from stages.model.heads import new_head, sequence_scores
from stages.model.placement import model_device
from stages.model.reward_model import attach_reward, reward_of
from stages.model.sequences import (
    Response,
    SequenceBatch,
    sampled_batch,
    token_logprobs,
    token_values,
)
from stages.model.tokenization import Tokenization
from stages.objectives.losses import (
    gae_advantages,
    kl_penalized_rewards,
    masked_whiten,
)
from stages.ppo.spec import GENERATION_BATCH, PPOSection
from stages.training.distributed import LOCAL, Distributed
from stages.training.rewards import RewardSource, reward_source

if TYPE_CHECKING:
    from peft import PeftModel

REFERENCE, POLICY, REWARD, VALUE = "reference", "policy", "reward", "value"
TRAINABLE = [POLICY, VALUE]
VALUE_HEAD = "value_head.safetensors"


@dataclass
class PPOModels:
    """What PPO runs on: one model holding the four adapters (reference, policy, reward, value) and the
    two small heads. Not RL's "actor": the policy is only one adapter of it."""

    model: PeftModel
    tokenization: Tokenization
    reward_head: torch.nn.Linear | None  # None when ppo.reward is the checker alone
    value_head: torch.nn.Linear
    fingerprint: str
    value_adapter: str = VALUE  # POLICY for ppo.value_model: shared
    # The score of a rollout (ppo.reward); None: the reward head alone, minus ppo.missing_eos_penalty
    # (the benchmarks, which hold no checker).
    reward: RewardSource | None = None

    @property
    def trainable(self) -> list[str]:
        """The adapters PPO trains: policy and value, or the policy alone when it carries the value head."""
        return [POLICY] if self.value_adapter == POLICY else TRAINABLE


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T)
    old_logprobs: torch.Tensor  # (B, T)
    old_values: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B, T) whitened
    returns: torch.Tensor  # (B, T)

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def batch(self) -> SequenceBatch:
        return SequenceBatch(self.input_ids, self.attention_mask, self.response_mask)


def build_models(cfg: PipelineConfig, inputs: dict[str, Path]) -> PPOModels:
    """One backbone; reference + policy from SFT, reward + value from the RM; value head from the score head.
    ``ppo.value_model: shared``: no value adapter, and the value head starts at zero on the policy's states.
    ``ppo.reward: checker``: no reward adapter; the value adapter starts from SFT, its head at zero."""
    import copy

    backbone, tokenization = stage_backbone(cfg)
    fp = backbone.fingerprint
    model = load_adapter(backbone.model, inputs["sft"], REFERENCE, fp)
    model = load_adapter(model, inputs["sft"], POLICY, fp, trainable=True)
    reward_head, scores = None, None
    if "model" in cfg.ppo.reward:
        model, reward_head = attach_reward(model, inputs["reward"], tokenization, fp)
        head = reward_head

        def scores(samples: list[Response]) -> list[float]:
            return reward_of(model, head, samples, tokenization.pad_id, missing_eos_penalty=0.0)

    rewards = reward_source(cfg.ppo, scores)  # a checker that cannot be imported fails here, before training
    if cfg.ppo.value_model == "shared" or reward_head is None:  # the value head starts at zero
        value_head = new_head(backbone.model.config.hidden_size, cfg.run.seed, model_device(model))
        with torch.no_grad():
            value_head.weight.zero_()
    else:
        value_head = copy.deepcopy(reward_head)
    value_head.requires_grad_(True)
    if cfg.ppo.value_model == "shared":  # the reward head reads the RM adapter's states, not the policy's
        models = PPOModels(model, tokenization, reward_head, value_head, fp, value_adapter=POLICY, reward=rewards)
    else:
        model = load_adapter(
            model, inputs["reward"] if reward_head is not None else inputs["sft"], VALUE, fp, trainable=True
        )
        models = PPOModels(model, tokenization, reward_head, value_head, fp, reward=rewards)
    model.set_adapter(POLICY)
    set_trainable(model, models.trainable)  # after set_adapter, which would silently freeze the value adapter
    return models


def collect_rollout(
    models: PPOModels,
    prompts: list[Prompt],
    ppo: PPOSection,
    kl_coef: float,
    seed: int,
    dist: Distributed = LOCAL,
    keys: list[int] | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """Sample with the policy, then score the sampled ids (``rollout_from_ids``); ``keys``: each prompt's
    sampling stream (``generate``), its position in the global batch."""
    prompt_ids = [models.tokenization.prompt_ids(p) for p in prompts]
    return rollout_from_ids(models, prompt_ids, ppo, kl_coef, seed, dist, prompts=prompts, keys=keys)


def rollout_from_ids(
    models: PPOModels,
    prompt_ids: list[list[int]],
    ppo: PPOSection,
    kl_coef: float,
    seed: int,
    dist: Distributed = LOCAL,
    prompts: list[Prompt] | None = None,
    keys: list[int] | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """Sample one response per prompt (token ids) with the policy, then score the sampled ids
    (``score_rollout``); ``prompts`` (what the ids render) are what a checker reads.
    ``bench/ppo_vs_trl.py`` times this with ``ppo_update`` as one PPO update."""
    model, tokenization = models.model, models.tokenization
    with active_adapter(model, POLICY):
        samples = generate(
            model,
            tokenization,
            prompt_ids,
            max_new_tokens=ppo.max_new_tokens,
            temperature=ppo.temperature,
            batch_size=GENERATION_BATCH,
            seed=seed,
            keys=keys,
            desc="rollout",
        )
    device = model_device(model)
    batch, logprobs = sampled_batch(samples, tokenization.pad_id, device)
    finished = torch.tensor([s.finished for s in samples], device=device)
    scores = None
    if models.reward is not None:
        if models.reward.checker is not None and prompts is None:
            raise ValueError("rollout_from_ids: a checker reads the prompts; pass them")
        scores = torch.tensor(models.reward(samples, prompts or [""] * len(samples)), device=device)
    return score_rollout(models, batch, finished, ppo, kl_coef, dist, logprobs=logprobs, scores=scores)


def score_rollout(
    models: PPOModels,
    batch: SequenceBatch,
    finished: torch.Tensor,
    ppo: PPOSection,
    kl_coef: float,
    dist: Distributed = LOCAL,
    logprobs: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """Policy and reference log-probs, reward and values, all without gradients, then ``shape_rollout``.

    ``logprobs`` (B, T): the policy's log-probs of the sampled tokens as generation computed them
    (``generate``'s ``token_logprobs``, aligned with ``input_ids``); without them the policy scores
    the batch in a forward pass of its own. Both equal within float rounding (tests/test_ppo.py).
    ``scores`` (B,): each response's reward (``ppo.reward``); without them, the reward head's score
    minus ``ppo.missing_eos_penalty`` for a response that never stopped.
    """
    model = models.model
    with torch.no_grad():  # at the sampling temperature: the distributions the tokens came from
        if logprobs is None:
            with active_adapter(model, POLICY):
                logprobs = token_logprobs(model, batch, ppo.temperature)
        with active_adapter(model, REFERENCE):
            ref_logprobs = token_logprobs(model, batch, ppo.temperature)
        if scores is None:
            with active_adapter(model, REWARD):
                scores = (
                    sequence_scores(model, models.reward_head, batch) - ppo.missing_eos_penalty * (~finished).float()
                )
        with active_adapter(model, models.value_adapter):
            values = token_values(model, models.value_head, batch)
    return shape_rollout(batch, finished, scores, logprobs, ref_logprobs, values, ppo, kl_coef, dist)


def shape_rollout(
    batch: SequenceBatch,
    finished: torch.Tensor,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    ppo: PPOSection,
    kl_coef: float,
    dist: Distributed = LOCAL,
) -> tuple[Rollout, dict[str, float]]:
    """KL-penalised per-token rewards (score on the last token), GAE and advantages whitened over the
    global batch (every rank's share of it under DeepSpeed)."""
    mask = batch.response_mask
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = gae_advantages(rewards, values, mask, ppo.gamma, ppo.lam)
    rollout = Rollout(
        batch.input_ids,
        batch.attention_mask,
        mask,
        logprobs,
        values,
        masked_whiten(advantages, mask, total=dist.total),
        returns,
    )
    stats = {
        "score": scores.mean().item(),
        "kl": kl.sum(-1).mean().item(),
        "kl_coef": kl_coef,
        "finished": finished.float().mean().item(),
        "response_length": mask.sum(-1).float().mean().item(),
    }
    return rollout, stats
