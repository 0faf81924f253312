"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative policy optimisation, with no value model, on ONE
copy of the frozen backbone.

    python -m stages.training.entry grpo --out runs/x/grpo --input sft=runs/x/sft [--input reward=runs/x/reward]

Adapters: ``reference`` (the SFT adapter, frozen), ``policy`` (starts from SFT, trained) and, when
``grpo.reward`` uses the model, ``reward`` (the reward stage's adapter + score head, frozen).

Each step: draw ``prompts_per_step`` prompts; sample ``num_generations`` (G) responses to each with the
policy (the tokenization contract's prompt ids; generation keeps each sampled token's log-prob);
reward them (``stages.training.rewards``: reward model, checker, or both); advantages are the rewards
centred in each prompt's group, divided by its std unless ``scale_rewards`` is false (the default: no
std division, as in Dr. GRPO; the loss stays a token mean over the batch, DAPO's aggregation, not Dr.
GRPO's constant divisor; a group of tied rewards has advantage 0); the reference log-probs of the
sampled ids come from one forward without gradients. Then ``num_iterations`` passes over minibatches
of ``grpo_loss``: the clipped surrogate plus ``beta`` times the k3 KL to the reference. Dropout stays
off throughout, as in PPO: the policy that is trained is the one that sampled.

Why not TRL's GRPOTrainer: it renders and tokenizes prompts itself and samples with its own stopping
rule, where this chain's contract fixes the ids (chat template, BOS once, the template's end of turn)
that the reward model was trained on; and its reward functions receive text, so the reward adapter
could only re-tokenize what was sampled. Our loop reuses PPO's pieces (generation log-probs, masked
token log-probs, the Updater on DeepSpeed, the resumable loop).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import torch

from stages.grpo.spec import GENERATION_BATCH, GRPOSection
from stages.io.artifacts import read_manifest, write_json
from stages.io.config import PipelineConfig
from stages.io.data import load_measured, load_rollout_prompts
from stages.io.formats import Prompt
from stages.io.samples import write_samples
from stages.model.adapters import active_adapter, count_trainable, load_adapter, save_adapter, set_trainable
from stages.model.backbone import stage_backbone
from stages.model.generation import generate
from stages.model.placement import model_device
from stages.model.probes import save_probe
from stages.model.reward_model import attach_reward, reward_of
from stages.model.sequences import Response, SequenceBatch, sampled_batch, token_logprobs
from stages.model.tokenization import Tokenization
from stages.objectives.losses import group_advantages, grpo_loss, tied_groups
from stages.training import runner
from stages.training.checkpoints import Checkpointer
from stages.training.distributed import LOCAL, Distributed
from stages.training.early_stopping import stopper_for
from stages.training.evaluation import evaluate_policy, final_evaluation, step_samples
from stages.training.learning_check import LearningCheck
from stages.training.logprob_gap import LogprobGap, gap_warning
from stages.training.loop import TrainingLoop
from stages.training.rewards import RewardSource, reward_source
from stages.training.updater import Updater

if TYPE_CHECKING:
    from peft import PeftModel

REFERENCE, POLICY = "reference", "policy"


def build_model(cfg: PipelineConfig, inputs: dict[str, Any]) -> tuple[PeftModel, Tokenization, RewardSource, str]:
    """One backbone with the reference and policy adapters (both from SFT) and, when the reward uses the
    model, the reward adapter and head; the policy active and the only trainable adapter."""
    backbone, tokenization = stage_backbone(cfg)
    model = load_adapter(backbone.model, inputs["sft"], REFERENCE, backbone.fingerprint)
    model = load_adapter(model, inputs["sft"], POLICY, backbone.fingerprint, trainable=True)
    scores = None
    if "model" in cfg.grpo.reward:
        model, head = attach_reward(model, inputs["reward"], tokenization, backbone.fingerprint)

        def scores(samples: list[Response]) -> list[float]:
            return reward_of(model, head, samples, tokenization.pad_id, missing_eos_penalty=0.0)

    source = reward_source(cfg.grpo, scores)  # a checker that cannot be imported fails here, before training
    model.set_adapter(POLICY)
    set_trainable(model, [POLICY])
    return model, tokenization, source, backbone.fingerprint


def sample_groups(
    model: PeftModel,
    tokenization: Tokenization,
    source: RewardSource,
    prompts: list[Prompt],
    grpo: GRPOSection,
    seed: int,
    positions: list[int] | None = None,
) -> tuple[SequenceBatch, torch.Tensor, torch.Tensor, dict[str, float]]:
    """G responses to each prompt from the policy, and their rewards. ``positions``: each prompt's place in
    the global batch (default its index); sample j of the prompt at position p draws from the stream of key
    p * G + j (``generate``), so a group is the same on any number of ranks.

    Returns the batch of (prompt, response) ids (N = len(prompts) * G rows, grouped by prompt), the
    sampling log-probs of its tokens (N, T), the rewards (N,) and statistics of the step's samples.
    """
    g = grpo.num_generations
    prompt_ids = [tokenization.prompt_ids(p) for p in prompts]
    positions = list(range(len(prompts))) if positions is None else positions
    with active_adapter(model, POLICY):
        samples = generate(
            model,
            tokenization,
            [ids for ids in prompt_ids for _ in range(g)],
            max_new_tokens=grpo.max_new_tokens,
            temperature=grpo.temperature,
            batch_size=GENERATION_BATCH,
            seed=seed,
            keys=[p * g + j for p in positions for j in range(g)],
            desc="grpo samples",
        )
    device = model_device(model)
    rewards = torch.tensor(source(samples, [p for p in prompts for _ in range(g)]), device=device)
    batch, logprobs = sampled_batch(samples, tokenization.pad_id, device)
    grouped = rewards.view(len(prompts), g)
    stats = {
        "reward": rewards.mean().item(),
        "reward_std": grouped.std(dim=1).mean().item(),
        "tied_groups": tied_groups(grouped).float().mean().item(),  # their advantages are 0
        "finished": sum(s.finished for s in samples) / len(samples),
        "response_length": batch.response_mask.sum(-1).float().mean().item(),
    }
    return batch, logprobs, rewards, stats


def grpo_step(
    model: PeftModel,
    batch: SequenceBatch,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    updater: Updater,
    grpo: GRPOSection,
    generator: torch.Generator,
    dist: Distributed = LOCAL,
) -> dict[str, float]:
    """Group advantages, the reference's log-probs, then ``num_iterations`` passes of minibatch updates of
    ``grpo_loss``. Token means are over the global minibatch under DeepSpeed (each rank's share).
    The first minibatch, trained before any step, measures the log-prob gap (``stages.training.logprob_gap``)."""
    advantages = group_advantages(rewards.view(-1, grpo.num_generations), grpo.scale_rewards).view(-1)  # (N,)
    with torch.no_grad(), active_adapter(model, REFERENCE):
        ref_logprobs = token_logprobs(model, batch, grpo.temperature)  # (N, T)
    totals: dict[str, float] = {}
    steps = 0
    gap = LogprobGap()
    for _ in range(grpo.num_iterations):
        order = torch.randperm(len(advantages), generator=generator, device="cpu")
        for start in range(0, len(order), grpo.minibatch_size):
            index = order[start : start + grpo.minibatch_size].to(advantages.device)
            mb = SequenceBatch(batch.input_ids[index], batch.attention_mask[index], batch.response_mask[index])
            share = dist.share_of_global_mean(mb.response_mask.sum())  # 1.0 locally
            with active_adapter(model, POLICY):
                logprobs = token_logprobs(model, mb, grpo.temperature)
            if steps == 0:
                gap.add(old_logprobs[index], logprobs, mb.response_mask)
            loss, stats = grpo_loss(
                logprobs,
                old_logprobs[index],
                ref_logprobs[index],
                advantages[index],
                mb.response_mask,
                grpo.clip_range,
                grpo.beta,
            )
            updater.step(share * loss, what="grpo loss")
            for key, value in {"loss": share * loss.item(), **stats}.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
    return {**{key: value / steps for key, value in totals.items()}, **gap.row(dist)}


def train_grpo(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    out, dist, grpo = ctx.staging, ctx.dist, cfg.grpo
    model, tokenization, source, fingerprint = build_model(cfg, ctx.inputs)
    context = model.get_base_model().config.max_position_embeddings
    prompts = load_rollout_prompts(cfg.data, cfg.task, tokenization, context)
    held_out, _ = load_measured(cfg.data, "eval", cfg.task, tokenization, context)
    trainable = count_trainable(model)
    learning = LearningCheck(model, dist, stage="grpo", adapter_kind=cfg.adapter.kind, learning_rate=grpo.learning_rate)
    count = dist.even_count(grpo.prompts_per_step, len(prompts), "grpo rollout prompts")
    updates_per_step = grpo.num_iterations * -(
        -(count // dist.world_size * grpo.num_generations) // grpo.minibatch_size
    )
    updater = Updater(
        model,
        grpo.learning_rate,
        warmup_steps=0,
        total_steps=grpo.max_steps * updates_per_step,
        max_grad_norm=grpo.max_grad_norm,
        schedule="constant",
        micro_batch_size=grpo.minibatch_size,
        dist=dist,
        bf16=cfg.backbone.dtype == "bfloat16",
    )
    checkpointer = Checkpointer(ctx.final, ctx.cache_key, updater, model, [POLICY], {}, fingerprint, dist)
    minibatch_order = torch.Generator().manual_seed(cfg.run.seed + 1000 * dist.rank)
    loop = TrainingLoop(
        checkpointer,
        desc="grpo",
        total=grpo.max_steps,
        log_every=1,
        checkpoint_every=grpo.checkpoint_every,
        samplers={"minibatch_order": minibatch_order},
        stopper=stopper_for(grpo.early_stopping),  # dropout is off throughout: no mode switch
        evaluate=lambda: evaluate_policy(
            model,
            tokenization,
            held_out,
            cfg.eval,
            cfg.run.seed,
            reference=REFERENCE,
            desc="early stopping",
            reward=source,
        ),
        samples=lambda step: step_samples(
            model, tokenization, held_out, cfg.eval, cfg.run.seed, step=step, reward=source
        ),
        samples_every=cfg.eval.samples_every,
    )
    loop.resume()

    def train_step(step: int, log: bool) -> dict[str, float]:
        # Every rank draws the same global sample of prompts and samples the groups of its own share.
        drawn = random.Random(cfg.run.seed + step).sample(prompts, count)
        batch, old_logprobs, rewards, stats = sample_groups(
            model,
            tokenization,
            source,
            dist.shard(drawn),
            cfg.grpo,
            seed=cfg.run.seed + step,
            positions=dist.shard(list(range(count))),
        )
        stats.update(grpo_step(model, batch, old_logprobs, rewards, updater, cfg.grpo, minibatch_order, dist))
        return {key: round(dist.mean(value), 5) for key, value in stats.items()}

    model.eval()  # dropout off: the policy trained is the one that sampled (as PPO, issue 14 fault 2)
    history = loop.run(train_step)
    metrics, final_samples = final_evaluation(
        model,
        tokenization,
        held_out,
        cfg.eval,
        cfg.run.seed,
        reference=REFERENCE,
        step=loop.last_step,
        desc="task_score (grpo)",
        reward=source,
    )
    write_samples(out, loop.samples + final_samples)
    metrics["task_score_sft"] = read_manifest(ctx.inputs["sft"])["metrics"]["task_score"]

    save_probe(model, tokenization.tokenizer, out)
    save_adapter(model, POLICY, out / "adapter")
    write_json(out / "history.json", history)
    # GRPO's loss is not meant to fall (advantages are re-centred every step): weights only.
    warnings = learning.warnings([])
    if gap := gap_warning(history, cfg.backbone.dtype, "grpo"):
        warnings.append(gap)
    if all(row["tied_groups"] == 1 for row in history):
        warnings.append(
            "grpo: every group's rewards were tied at every step, so every advantage was 0: the reward "
            f"({grpo.reward}) cannot tell the policy's samples apart"
        )
    return {
        **metrics,
        "warnings": warnings,
        "reward_source": grpo.reward,
        "steps": loop.last_step,
        "resumed_from_step": loop.start,
        "trainable_parameters": trainable,
        **loop.stopping_metrics(),
    }
