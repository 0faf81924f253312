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
from typing import Any

import torch

from stages.io.artifacts import read_manifest, write_json
from stages.io.config import EvalSection, PipelineConfig
from stages.io.data import load_measured, load_rollout_prompts
from stages.io.samples import Row, write_samples
from stages.model.adapters import active_adapter, count_trainable, save_adapter
from stages.model.heads import save_head
from stages.model.probes import save_probe
from stages.model.sequences import (
    token_logprobs_and_entropy,
    token_logprobs_entropy_and_values,
    token_values,
)
from stages.objectives.kl_control import build_kl_controller
from stages.objectives.losses import (
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from stages.ppo.rollout import POLICY, REFERENCE, VALUE, VALUE_HEAD, PPOModels, Rollout, build_models, collect_rollout
from stages.ppo.spec import PPOSection
from stages.training import runner
from stages.training.checkpoints import Checkpointer
from stages.training.distributed import LOCAL, Distributed
from stages.training.early_stopping import stopper_for
from stages.training.evaluation import evaluate_policy, final_evaluation, step_samples
from stages.training.learning_check import LearningCheck
from stages.training.logprob_gap import LogprobGap, gap_warning
from stages.training.loop import TrainingLoop
from stages.training.updater import Updater


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
        samples=lambda update: _step_samples(models, held_out, cfg.eval, cfg.run.seed, update),
        samples_every=cfg.eval.samples_every,
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
    with active_adapter(model, POLICY):
        metrics, final_samples = final_evaluation(
            model,
            models.tokenization,
            held_out,
            cfg.eval,
            cfg.run.seed,
            reference=REFERENCE,
            step=loop.last_step,
            desc="task_score (ppo)",
            reward=models.reward,
        )
    write_samples(out, loop.samples + final_samples)
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


def _step_samples(models: PPOModels, held_out: list, evaluation: EvalSection, seed: int, update: int) -> list[Row]:
    """The policy's sample table after ``update`` (``stages.training.evaluation.step_samples``)."""
    with active_adapter(models.model, POLICY):
        return step_samples(
            models.model, models.tokenization, held_out, evaluation, seed, step=update, reward=models.reward
        )


def _evaluate(models: PPOModels, held_out: list, evaluation: EvalSection, seed: int, desc: str) -> dict[str, float]:
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
