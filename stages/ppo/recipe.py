"""PPO with policy, reference, reward and value as adapters on ONE copy of the frozen backbone.

    python -m stages.training.entry ppo --out runs/x/ppo --input sft=runs/x/sft --input reward=runs/x/reward

Adapters (all of the configured kind, on one PeftModel around one backbone):
    reference  the SFT adapter, frozen          policy  starts from SFT, trained
    reward     the RM adapter + score head, frozen   value   starts from the RM, trained, + value head
With ``ppo.value_model: shared`` there is no value adapter: the value head (from zeros) reads the
policy adapter's hidden states (detached), and one forward per minibatch serves both losses.
``ppo.reward`` says where the score comes from (``stages.training.rewards``): the reward model, a
checker, or both. With the checker alone there is no reward adapter, and the value adapter starts from
the SFT adapter, its head from zeros.

Each update: sample responses with the policy from the tokenization contract's prompt ids (KV cache,
left padding, stopping at EOS or the chat template's end of turn); score the sampled ids without
gradients (reference log-probs, reward, values); shape per-token rewards with the KL penalty (score on
the last token); GAE + whitening; then PPO epochs over minibatches of the clipped policy and value
losses. The losses and GAE are the pure functions of ``stages.objectives.losses``. A checkpoint every
``ppo.checkpoint_every`` updates lets a killed run resume where it stopped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stages.io.artifacts import read_manifest, write_json
from stages.io.config import EvalSection, PipelineConfig
from stages.io.data import load_measured, load_rollout_prompts
from stages.io.formats import Prompt
from stages.model.adapters import active_adapter, count_trainable, load_adapter, save_adapter, set_trainable
from stages.model.backbone import stage_backbone
from stages.model.generation import generate
from stages.model.heads import new_head, save_head, sequence_scores
from stages.model.placement import model_device
from stages.model.probes import save_probe
from stages.model.reward_model import attach_reward, reward_of
from stages.model.sequences import (
    Response,
    SequenceBatch,
    sampled_batch,
    token_logprobs,
    token_logprobs_and_entropy,
    token_logprobs_entropy_and_values,
    token_values,
)
from stages.model.tokenization import Tokenization
from stages.objectives.kl_control import build_kl_controller
from stages.objectives.losses import (
    gae_advantages,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from stages.ppo.spec import GENERATION_BATCH, PPOSection
from stages.training import runner
from stages.training.checkpoints import Checkpointer
from stages.training.distributed import LOCAL, Distributed
from stages.training.early_stopping import stopper_for
from stages.training.evaluation import evaluate_policy
from stages.training.learning_check import LearningCheck
from stages.training.logprob_gap import LogprobGap, gap_warning
from stages.training.loop import TrainingLoop
from stages.training.rewards import RewardSource, reward_source
from stages.training.updater import Updater

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


def ppo_updater(models: PPOModels, ppo: PPOSection, dist: Distributed = LOCAL, bf16: bool = False) -> Updater:
    """AdamW (constant learning rate) over the trained adapters (``PPOModels.trainable``) and the value head;
    ``bf16``: the backbone computes in bfloat16 (DeepSpeed's engine is told so)."""
    return Updater(
        torch.nn.ModuleDict({"model": models.model, "value_head": models.value_head}),
        ppo.learning_rate,
        warmup_steps=0,
        total_steps=ppo.updates,
        max_grad_norm=ppo.max_grad_norm,
        schedule="constant",
        gradient_accumulation=ppo.gradient_accumulation,
        micro_batch_size=ppo.minibatch_size,
        dist=dist,
        bf16=bf16,
    )


def ppo_update(
    models: PPOModels,
    rollout: Rollout,
    updater: Updater,
    ppo: PPOSection,
    generator: torch.Generator,
    dist: Distributed = LOCAL,
) -> dict[str, float]:
    """PPO epochs x minibatches of clipped policy + value loss, with gradient accumulation and clipping.

    Each minibatch's token means are weighted by its share of the tokens of its update (every rank's,
    every accumulated minibatch's), so an update's gradient (and the logged losses, averaged over ranks)
    is the token mean over all it covers: ``minibatch_size=4`` with ``gradient_accumulation=2`` equals
    ``minibatch_size=8`` (tests/test_ppo.py), and a launched run equals the local one.
    ``generator`` draws the minibatch order (a sampler of the training loop: resumed exactly).
    The minibatches before the update's first optimizer step also measure the log-prob gap
    (``stages.training.logprob_gap``): sampling's log-probs against the training forward's.
    """
    totals: dict[str, float] = {}
    steps = 0
    stopped = False
    gap = LogprobGap()
    for epoch in range(ppo.ppo_epochs):
        order = torch.randperm(rollout.input_ids.shape[0], generator=generator, device="cpu")  # indexes any device
        minibatches = list(order.split(ppo.minibatch_size))
        for index, rows in enumerate(minibatches):
            mb = rollout.select(rows)
            # The update's window: ``gradient_accumulation`` minibatches from the epoch's start (the last one
            # may be short); each is weighed by its tokens in it, over every rank (1.0 locally without accumulation).
            first = index - index % ppo.gradient_accumulation
            window = sum(rollout.response_mask[r].sum() for r in minibatches[first : first + ppo.gradient_accumulation])
            share = dist.share_of_global_mean(mb.response_mask.sum(), window, ppo.gradient_accumulation)
            before_any_step = epoch == 0 and index < ppo.gradient_accumulation
            policy_loss, value_loss, entropy, loss_stats = _add_minibatch_losses(
                models, mb, updater, share, ppo, gap if before_any_step else None
            )
            updater.finish_micro_step(boundary=index == len(minibatches) - 1)  # an epoch ends on an update
            step_stats = {
                "policy_loss": share * policy_loss.item(),
                "value_loss": share * value_loss.item(),
                "entropy": masked_mean(entropy, mb.response_mask).item(),
                **loss_stats,
            }
            for key, value in step_stats.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
            stopped = _over_target_kl(loss_stats["approx_kl"], updater, ppo, dist)
            if stopped:
                break
        if stopped:
            break
    return {
        **{key: value / steps for key, value in totals.items()},
        "stopped_by_target_kl": float(stopped),
        "minibatches": float(steps),
        **gap.row(dist),
    }


def _over_target_kl(approx_kl: float, updater: Updater, ppo: PPOSection, dist: Distributed) -> bool:
    """Whether to stop this update's remaining epochs: the minibatch's approx-KL to the rollout policy
    (averaged over ranks, so every rank stops together) above 1.5 x ``ppo.target_kl``, as Spinning Up's
    and Stable-Baselines3's PPO do. Checked only after an update (no gradients pending in accumulation),
    so stopping never leaves half-accumulated gradients for the next update."""
    if ppo.target_kl is None or updater.micro_steps != 0:
        return False
    return dist.mean(approx_kl) > 1.5 * ppo.target_kl


def _add_minibatch_losses(
    models: PPOModels, mb: Rollout, updater: Updater, share: float, ppo: PPOSection, gap: LogprobGap | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """The clipped policy and value losses of one minibatch, handed to ``updater`` (each scaled by the
    rank's ``share``); returns them, the entropies (B, T) and their stats. ``gap``: add the minibatch's
    sampling-versus-training log-prob gap to it (only before the update's first step)."""
    model = models.model
    if models.value_adapter == POLICY:  # shared: one forward, one backward for both losses
        with active_adapter(model, POLICY):
            logprobs, entropy, values = token_logprobs_entropy_and_values(
                model, models.value_head, mb.batch, ppo.temperature
            )
        if gap is not None:
            gap.add(mb.old_logprobs, logprobs, mb.response_mask)
        policy_loss, policy_stats = ppo_policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, ppo.clip_range
        )
        value_loss, value_stats = ppo_value_loss(
            values, mb.old_values, mb.returns, mb.response_mask, ppo.clip_range_value
        )
        updater.add_loss(share * (policy_loss + ppo.value_coef * value_loss), "ppo policy + value loss")
        return policy_loss, value_loss, entropy, {**policy_stats, **value_stats}
    with active_adapter(model, POLICY):
        logprobs, entropy = token_logprobs_and_entropy(model, mb.batch, ppo.temperature)
    if gap is not None:
        gap.add(mb.old_logprobs, logprobs, mb.response_mask)
    policy_loss, policy_stats = ppo_policy_loss(
        logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, ppo.clip_range
    )
    updater.add_loss(share * policy_loss, "ppo policy loss")  # locally its graph is freed here
    with active_adapter(model, VALUE):
        values = token_values(model, models.value_head, mb.batch)
    value_loss, value_stats = ppo_value_loss(values, mb.old_values, mb.returns, mb.response_mask, ppo.clip_range_value)
    updater.add_loss(share * ppo.value_coef * value_loss, "ppo value loss")
    return policy_loss, value_loss, entropy, {**policy_stats, **value_stats}


def train_ppo(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    out, inputs, dist = ctx.staging, ctx.inputs, ctx.dist
    models = build_models(cfg, inputs)
    model, ppo = models.model, cfg.ppo
    trainable = count_trainable(model)
    learning = LearningCheck(
        torch.nn.ModuleDict({"model": model, "value_head": models.value_head}),
        dist,
        stage="ppo",
        adapter_kind=cfg.adapter.kind,
        learning_rate=ppo.learning_rate,
    )
    updater = ppo_updater(models, cfg.ppo, dist, bf16=cfg.backbone.dtype == "bfloat16")
    kl_ctl = build_kl_controller(ppo.kl_controller, kl_coef=ppo.kl_coef, target=ppo.kl_target, horizon=ppo.kl_horizon)
    context = model.get_base_model().config.max_position_embeddings
    prompts = load_rollout_prompts(cfg.data, cfg.task, models.tokenization, context)
    held_out, _ = load_measured(cfg.data, "eval", cfg.task, models.tokenization, context)

    checkpointer = Checkpointer(
        ctx.final,
        ctx.cache_key,
        updater,
        model,
        models.trainable,
        {"value_head": models.value_head},
        models.fingerprint,
        dist,
    )
    minibatch_order = torch.Generator().manual_seed(cfg.run.seed + 1000 * dist.rank)
    loop = TrainingLoop(
        checkpointer,
        desc="ppo",
        total=ppo.updates,
        log_every=1,
        checkpoint_every=ppo.checkpoint_every,
        samplers={"minibatch_order": minibatch_order},
        step_key="update",
        stopper=stopper_for(ppo.early_stopping),  # dropout is off throughout: no mode switch
        evaluate=lambda: _evaluate(models, held_out, cfg.eval, cfg.run.seed, desc="early stopping"),
    )
    if state := loop.resume():
        kl_ctl.load_state_dict(state["kl_controller"])

    count = dist.even_count(ppo.rollout_prompts, len(prompts), "ppo rollout prompts")

    def train_step(update: int, log: bool) -> dict[str, float]:
        # Every rank draws the same global sample of prompts and rolls out an equal share of it, each prompt
        # from the sampling stream of its global position: the rollout is the same on any number of ranks.
        drawn = random.Random(cfg.run.seed + update).sample(prompts, count)
        rollout, stats = collect_rollout(
            models,
            dist.shard(drawn),
            cfg.ppo,
            kl_ctl.value,
            seed=cfg.run.seed + update,
            dist=dist,
            keys=dist.shard(list(range(count))),
        )
        stats.update(ppo_update(models, rollout, updater, cfg.ppo, minibatch_order, dist))
        stats = {key: dist.mean(value) for key, value in stats.items()}  # one KL (and coefficient) on every rank
        kl_ctl.update(stats["kl"], n_steps=len(drawn))
        return {k: round(v, 5) for k, v in stats.items()}

    # Dropout stays off throughout, in scoring and in the PPO epochs (TRL's PPO: disable_dropout=True): with it,
    # the policy trained would not be the one that sampled, so update 1's ratio would not be 1 and the KL
    # penalty of a policy equal to its reference would not be 0 (issue 14, fault 2).
    model.eval()
    history = loop.run(train_step, lambda: {"kl_controller": kl_ctl.state_dict()})
    metrics = _evaluate(models, held_out, cfg.eval, cfg.run.seed)
    metrics["task_score_sft"] = read_manifest(inputs["sft"])["metrics"]["task_score"]

    with active_adapter(model, POLICY):
        save_probe(model, models.tokenization.tokenizer, out)
    save_adapter(model, POLICY, out / "adapter")
    if models.value_adapter == VALUE:
        save_adapter(model, VALUE, out / "value")
    save_head(models.value_head, out / VALUE_HEAD, models.fingerprint)
    write_json(out / "history.json", history)
    # PPO's losses are not meant to fall (advantages are re-whitened every update): weights only.
    warnings = learning.warnings([])
    if gap := gap_warning(history, cfg.backbone.dtype, "ppo"):
        warnings.append(gap)
    return {
        **metrics,
        "warnings": warnings,
        "reward_source": ppo.reward,
        "updates": loop.last_step,
        "resumed_from_update": loop.start,
        "final_kl_coef": kl_ctl.value,
        "trainable_parameters": trainable,
        "updates_stopped_by_target_kl": sum(row.get("stopped_by_target_kl", 0) for row in history),
        **loop.stopping_metrics(),
    }


def _evaluate(
    models: PPOModels, held_out: list, evaluation: EvalSection, seed: int, desc: str = "task_score (ppo)"
) -> dict[str, float]:
    """Held-out task_score of the policy, its KL to the reference and the mean reward, on the same samples."""
    with active_adapter(models.model, POLICY):
        return evaluate_policy(
            models.model,
            models.tokenization,
            held_out,
            evaluation,
            seed,
            reference=REFERENCE,
            desc=desc,
            reward=models.reward,
        )
