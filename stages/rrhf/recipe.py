"""RRHF (Yuan et al. 2023): rank sampled responses by reward; train with ranking loss + SFT loss.

    python -m stages.training.entry rrhf --out runs/manual/rrhf --input sft=runs/x/sft --input reward=runs/x/reward

1. For each training prompt, sample k candidates from the SFT policy (or read offline ranked data
   ``{"query", "responses", "scores"}`` from ``data.ranked``, in which case no reward model is needed).
2. Score them (``rrhf.reward``): with the ``reward`` adapter + head on the same backbone, a checker
   (then no reward model is needed either), or both (``stages.training.rewards``).
3. Train the ``policy`` adapter, initialised from the SFT adapter, on ``rrhf_loss``: hinge ranking over
   length-normalised log-probabilities of misordered pairs plus the NLL of the best candidate.

Unlike the reference implementation: any batch size (its #23), every row of the batch counts (#29/#48),
and padding never enters the SFT mean (#51) - see ``stages.objectives.losses.rrhf_loss``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from stages.io.artifacts import read_manifest, write_json
from stages.io.config import ConfigError, PipelineConfig
from stages.io.data import load_measured, load_rollout_prompts
from stages.io.formats import Prompt
from stages.io.samples import write_samples
from stages.model.adapters import active_adapter, count_trainable, load_adapter, save_adapter, set_trainable
from stages.model.backbone import stage_backbone
from stages.model.generation import generate
from stages.model.placement import model_device
from stages.model.probes import save_probe
from stages.model.reward_model import attach_reward, reward_of
from stages.model.sequences import Response, from_token_ids, token_logprobs
from stages.model.tokenization import Tokenization
from stages.objectives.losses import rrhf_loss
from stages.rrhf.spec import GENERATION_BATCH, RANKING_GROUPS, RRHFSection
from stages.training import runner
from stages.training.checkpoints import Checkpointer
from stages.training.early_stopping import evaluating, stopper_for
from stages.training.evaluation import evaluate_policy, final_evaluation, step_samples
from stages.training.learning_check import LearningCheck
from stages.training.logprob_gap import LogprobGap, gap_warning
from stages.training.loop import TrainingLoop
from stages.training.rewards import RewardSource, reward_source
from stages.training.updater import Updater

if TYPE_CHECKING:
    from peft import PeftModel

POLICY, REFERENCE = "policy", "reference"
# Memory bounds, not hyper-parameters: prompts sampled at once, groups scored at once for ranking accuracy.


@dataclass
class Group:
    """One prompt's candidates, their token ids (what is trained on) and their rewards."""

    prompt: Prompt
    responses: list[str]  # texts, for logs
    finished: list[bool]
    rewards: list[float]
    prompt_ids: list[int]  # the contract's (rendered once, not at every step)
    response_ids: list[list[int]]  # the sampled ids (end token included when finished), or the contract's


def sample_groups(
    model: PeftModel,
    source: RewardSource,
    tokenization: Tokenization,
    prompts: list[Prompt],
    rrhf: RRHFSection,
    seed: int,
    positions: list[int] | None = None,
    gap: LogprobGap | None = None,
) -> list[Group]:
    """k policy samples per prompt, scored by ``rrhf.reward`` (the reward model scores the sampled ids).
    ``positions``: each prompt's place among all ranks' prompts (default its index); candidate j of the
    prompt at position p draws from the stream of key p * k + j (``generate``): the same on any number of ranks.
    ``seed``: the sampling seed. ``gap``: add the samples' sampling-versus-scoring log-prob gap to it
    (``stages.training.logprob_gap``)."""
    k = rrhf.num_candidates
    prompt_ids = [tokenization.prompt_ids(p) for p in prompts]
    positions = list(range(len(prompts))) if positions is None else positions
    with active_adapter(model, POLICY):
        samples = generate(
            model,
            tokenization,
            [ids for ids in prompt_ids for _ in range(k)],
            max_new_tokens=rrhf.max_new_tokens,
            temperature=rrhf.temperature,
            batch_size=GENERATION_BATCH,
            seed=seed,
            keys=[p * k + j for p in positions for j in range(k)],
            desc="rrhf candidates",
        )
        if gap is not None:
            gap.add_scored(model, samples, tokenization.pad_id, rrhf.temperature)
    rewards = source(samples, [p for p in prompts for _ in range(k)])
    groups = []
    for i, prompt in enumerate(prompts):
        mine = samples[i * k : (i + 1) * k]
        groups.append(
            Group(
                prompt,
                [s.text for s in mine],
                [s.finished for s in mine],
                rewards[i * k : (i + 1) * k],
                prompt_ids[i],
                [list(s.token_ids) for s in mine],
            )
        )
    return groups


def offline_groups(records: list[dict[str, Any]], tokenization: Tokenization) -> list[Group]:
    """Groups of ``data.ranked`` rows, each response tokenized by the contract (all finished)."""
    return [
        Group(
            r["query"],
            r["responses"],
            [True] * len(r["responses"]),
            [float(x) for x in r["scores"]],
            tokenization.prompt_ids(r["query"]),
            [tokenization.response_ids(r["query"], t) for t in r["responses"]],
        )
        for r in records
    ]


def group_logprobs(
    model: PeftModel, tokenization: Tokenization, groups: list[Group]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Length-normalised response log-probs (B, K), rewards (B, K) and the mask of real candidates (B, K)."""
    rows = [(g.prompt_ids, ids) for g in groups for ids in g.response_ids]
    device = model_device(model)
    batch = from_token_ids(rows, tokenization.pad_id, device)
    per_token = token_logprobs(model, batch)  # (N, T), 0 off the response
    normalised = per_token.sum(-1) / batch.response_mask.sum(-1).clamp(min=1)  # (N,)
    width = max(len(g.responses) for g in groups)
    logprobs = torch.zeros(len(groups), width, device=device)
    rewards = torch.tensor([list(g.rewards) + [0.0] * (width - len(g.rewards)) for g in groups], device=device)
    mask = torch.tensor(
        [[True] * len(g.responses) + [False] * (width - len(g.responses)) for g in groups], device=device
    )
    start = 0
    for i, g in enumerate(groups):  # ragged groups (offline data) -> padded (B, K)
        n = len(g.responses)
        logprobs[i, :n] = normalised[start : start + n]
        start += n
    return logprobs, rewards, mask


def ranking_accuracy(model: PeftModel, tokenization: Tokenization, groups: list[Group]) -> float | None:
    """Share of differently-rewarded candidate pairs that the policy's log-probs order like the reward;
    None when every group's rewards are tied (no pair to order: the ranking loss is zero)."""
    agree = total = 0
    with torch.no_grad():
        for start in range(0, len(groups), RANKING_GROUPS):
            logprobs, rewards, mask = group_logprobs(model, tokenization, groups[start : start + RANKING_GROUPS])
            valid = mask[:, :, None] & mask[:, None, :] & (rewards[:, :, None] > rewards[:, None, :])  # (B, K, K)
            agree += (valid & (logprobs[:, :, None] > logprobs[:, None, :])).sum().item()
            total += valid.sum().item()
    return agree / total if total else None


def train_rrhf(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    out, inputs, dist, rr = ctx.staging, ctx.inputs, ctx.dist, cfg.rrhf
    backbone, tokenization = stage_backbone(cfg)
    context = backbone.model.config.max_position_embeddings
    held_out, _ = load_measured(cfg.data, "eval", cfg.task, tokenization, context)
    model = load_adapter(backbone.model, inputs["sft"], REFERENCE, backbone.fingerprint)  # for the final KL only
    model = load_adapter(model, inputs["sft"], POLICY, backbone.fingerprint, trainable=True)
    source = None
    if not cfg.data.ranked:
        scores = None
        if "model" in rr.reward:
            model, head = attach_reward(model, inputs["reward"], tokenization, backbone.fingerprint)

            def scores(samples: list[Response]) -> list[float]:
                return reward_of(model, head, samples, tokenization.pad_id, missing_eos_penalty=0.0)

        source = reward_source(rr, scores)  # a checker that cannot be imported fails here, before training
    model.set_adapter(POLICY)
    set_trainable(model, [POLICY])
    learning = LearningCheck(model, dist, stage="rrhf", adapter_kind=cfg.adapter.kind, learning_rate=rr.learning_rate)
    updater = Updater(
        model,
        rr.learning_rate,
        rr.warmup_steps,
        rr.max_steps,
        micro_batch_size=rr.batch_size,
        dist=dist,
        bf16=cfg.backbone.dtype == "bfloat16",
    )
    checkpointer = Checkpointer(ctx.final, ctx.cache_key, updater, model, [POLICY], {}, backbone.fingerprint, dist)
    draws = random.Random(cfg.run.seed)  # every rank draws the same global batch and trains its share, as reward does
    measure = evaluating(
        model,
        lambda: evaluate_policy(
            model,
            tokenization,
            held_out,
            cfg.eval,
            cfg.run.seed,
            reference=REFERENCE,
            desc="early stopping",
            reward=source,
        ),
    )
    loop = TrainingLoop(
        checkpointer,
        desc="rrhf",
        total=rr.max_steps,
        log_every=rr.logging_steps,
        checkpoint_every=rr.checkpoint_every,
        samplers={"draws": draws},
        stopper=stopper_for(rr.early_stopping),
        evaluate=measure,
        samples=lambda step: step_samples(
            model, tokenization, held_out, cfg.eval, cfg.run.seed, step=step, reward=source
        ),
        samples_every=cfg.eval.samples_every,
    )
    state = loop.resume()
    sampling_gap: dict[str, float] = {}  # of the sampled candidates (none for data.ranked)
    if state is not None:  # the candidates are part of the state: resuming never resamples them
        groups = [Group(**g) for g in state["groups"]]
        sampling_gap = state["sampling_gap"]
    elif cfg.data.ranked:
        ranked, _ = load_measured(cfg.data, "ranked", cfg.task, tokenization, context)
        groups = offline_groups(ranked, tokenization)
    else:  # each rank samples candidates for its share of the prompts; then every rank holds all groups, in order
        prompts = load_rollout_prompts(cfg.data, cfg.task, tokenization, context)
        random.Random(cfg.run.seed).shuffle(prompts)
        chosen = prompts[: rr.num_prompts]
        gap = LogprobGap()
        groups = dist.unshard(
            sample_groups(
                model,
                source,
                tokenization,
                dist.shard(chosen),
                rr,
                cfg.run.seed + 1,
                positions=dist.shard(list(range(len(chosen)))),
                gap=gap,
            )
        )
        sampling_gap = gap.row(dist)
    accuracy_before = state["accuracy_before"] if state else ranking_accuracy(model, tokenization, groups)
    if len(groups) < dist.world_size:
        raise ConfigError(
            f"rrhf: {len(groups)} candidate groups cannot be shared by {dist.world_size} ranks; "
            "raise rrhf.num_prompts (or add ranked rows) or lower distributed.num_processes"
        )
    batch_size = min(rr.batch_size * dist.world_size, len(groups))

    def train_step(step: int, log: bool) -> dict[str, float] | None:
        shard = dist.shard(draws.sample(groups, batch_size))
        logprobs, rewards, mask = group_logprobs(model, tokenization, shard)
        loss, stats = rrhf_loss(logprobs, rewards, mask, sft_nll=-logprobs, rank_weight=rr.rank_weight)
        # Unequal shards: weigh per group (1.0 locally).
        share = dist.share_of_global_mean(torch.tensor(len(shard), device=model_device(model)))
        updater.step(share * loss, what=f"rrhf loss at step {step}")
        if not log:
            return None
        return {
            "loss": round(dist.mean(share * loss.item()), 5),
            **{key: dist.mean(share * value) for key, value in stats.items()},
        }

    model.train()
    history = loop.run(
        train_step,
        lambda: {
            "accuracy_before": accuracy_before,
            "sampling_gap": sampling_gap,
            "groups": [asdict(g) for g in groups],
        },
    )
    model.eval()

    evaluated, final_samples = final_evaluation(
        model,
        tokenization,
        held_out,
        cfg.eval,
        cfg.run.seed,
        reference=REFERENCE,
        step=loop.last_step,
        desc="task_score (rrhf)",
        reward=source,
    )
    write_samples(out, loop.samples + final_samples)
    metrics: dict[str, Any] = {
        **evaluated,
        "task_score_sft": read_manifest(inputs["sft"])["metrics"]["task_score"],
        "ranking_accuracy_before": accuracy_before,
        "ranking_accuracy": ranking_accuracy(model, tokenization, groups),
        "candidate_reward": sum(sum(g.rewards) for g in groups) / sum(len(g.rewards) for g in groups),
    }
    save_probe(model, tokenization.tokenizer, out)
    save_adapter(model, POLICY, out / "adapter")
    write_json(out / "history.json", history)
    warnings = learning.warnings(history, rr.warmup_steps)
    if sampling_gap and (gap_warned := gap_warning([sampling_gap], cfg.backbone.dtype, "rrhf")):
        warnings.append(gap_warned)
    if accuracy_before is None:
        warnings.append(
            "every candidate group's rewards are tied: the ranking loss is zero and only the SFT term "
            "trained (ranking_accuracy is null)"
        )
    return {
        **metrics,
        "warnings": warnings,
        "trainable_parameters": count_trainable(model),
        "groups": len(groups),
        "resumed_from_step": loop.start,
        "reward_source": "data.ranked" if cfg.data.ranked else rr.reward,
        **sampling_gap,
        **loop.stopping_metrics(),
    }
