"""Reward modelling: a ``reward`` adapter plus a scalar score head, trained with the Bradley-Terry loss.

    python -m stages.training.entry reward --out runs/manual/reward [--config ...] [--set reward.max_steps=50]

Why not TRL's RewardTrainer: it needs an ``AutoModelForSequenceClassification``, a second object around
the backbone. Our reward is the causal LM's own final hidden state at the last token (reward adapter
active) through a ``Linear(hidden, 1)`` head, the exact path PPO and RRHF score with later on the one
shared backbone. The loop is small: the tokenization contract's ids of both sides of each pair (the
ids PPO and RRHF later score), score them, ``pairwise_reward_loss``, step.

Artifact: ``adapter/`` (PEFT), ``score_head.safetensors``, ``probe_scores.json`` (scores of held-out
texts, which every later stage re-computes to prove the head it loaded is the one trained here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from stages.io.artifacts import write_json
from stages.io.config import PipelineConfig
from stages.io.data import Record, evaluation_sample, load_measured, source_name, split_by_prompt
from stages.io.progress import progress
from stages.model.adapters import (
    RankAllocation,
    attach_adapter,
    count_trainable,
    save_adapter,
)
from stages.model.backbone import stage_backbone
from stages.model.heads import SCORE_HEAD, new_head, save_head, sequence_scores
from stages.model.placement import model_device
from stages.model.reward_model import ADAPTER_NAME, PROBES, probe_scores
from stages.model.tokenization import Tokenization
from stages.objectives.losses import pairwise_reward_loss
from stages.reward.spec import EVAL_PAIRS
from stages.training import runner
from stages.training.checkpoints import Checkpointer
from stages.training.distributed import gathered
from stages.training.early_stopping import evaluating, stopper_for
from stages.training.learning_check import LearningCheck
from stages.training.loop import TrainingLoop
from stages.training.updater import Updater

if TYPE_CHECKING:
    from peft import PeftModel

    from stages.model.sequences import SequenceBatch


def preference_batch(tokenization: Tokenization, pairs: list[Record], device: torch.device | str) -> SequenceBatch:
    """The B chosen rows, then the B rejected rows, of preference pairs, on ``device``: (2B, T)."""
    prompts = [p["prompt"] for p in pairs]
    return tokenization.batch(prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], device)


def score_pairs(
    model: PeftModel, head: torch.nn.Linear, tokenization: Tokenization, pairs: list[Record]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores, rejected scores), each (B,), in one forward over both sides."""
    batch = preference_batch(tokenization, pairs, model_device(model))
    scores = sequence_scores(model, head, batch)  # (2B,)
    return scores[: len(pairs)], scores[len(pairs) :]


def evaluate_pairs(
    model: PeftModel,
    head: torch.nn.Linear,
    tokenization: Tokenization,
    pairs: list[Record],
    batch_size: int = EVAL_PAIRS,
) -> dict[str, float]:
    chosen, rejected = [], []
    starts = progress(range(0, len(pairs), batch_size), desc="held-out pairs", unit="batch", leave=False)
    with torch.no_grad():
        for start in starts:
            c, r = score_pairs(model, head, tokenization, pairs[start : start + batch_size])
            chosen.append(c)
            rejected.append(r)
    margin = torch.cat(chosen) - torch.cat(rejected)
    return {"pair_accuracy": (margin > 0).float().mean().item(), "reward_margin": margin.mean().item()}


def train_reward(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    out, dist, rm = ctx.staging, ctx.dist, cfg.reward
    backbone, tokenization = stage_backbone(cfg)
    context = backbone.model.config.max_position_embeddings
    pairs, lengths = load_measured(cfg.data, "preferences", cfg.task, tokenization, context)
    if dist.is_main and (warning := lengths.warning()):
        print(f"warning: {warning}; pairs are scored whole, past the backbone's {context}-token context", flush=True)
    train, held_out = split_by_prompt(pairs, rm.eval_fraction, source_name(cfg.data.preferences))
    held = evaluation_sample(held_out, rm.eval_max_pairs, cfg.run.seed)
    model = attach_adapter(backbone.model, cfg.adapter, ADAPTER_NAME, total_steps=rm.max_steps)
    head = new_head(backbone.model.config.hidden_size, cfg.run.seed, model_device(model))
    # The pairwise loss sees only score differences, so the bias's gradient is rounding noise, which Adam
    # scales up into real steps (it drifted to 4.6e-4): held at 0, the head is transformers' bias-free
    # sequence-classification score layer, and `rlhf export --merge` reproduces the scores exactly.
    head.bias.requires_grad_(False)
    trainable = count_trainable(model) + sum(p.numel() for p in head.parameters() if p.requires_grad)
    trained = torch.nn.ModuleDict({"model": model, "head": head})
    learning = LearningCheck(
        trained, dist, stage="reward", adapter_kind=cfg.adapter.kind, learning_rate=rm.learning_rate
    )
    updater = Updater(
        trained,
        rm.learning_rate,
        rm.warmup_steps,
        rm.max_steps,
        micro_batch_size=rm.batch_size,
        dist=dist,
        bf16=cfg.backbone.dtype == "bfloat16",
        rank_allocation=RankAllocation.of(model),
    )
    checkpointer = Checkpointer(
        ctx.final, ctx.cache_key, updater, model, [ADAPTER_NAME], {"score_head": head}, backbone.fingerprint, dist
    )
    batches = EpochBatches(len(train), rm.batch_size * dist.world_size, cfg.run.seed)
    loop = TrainingLoop(
        checkpointer,
        desc="reward",
        total=rm.max_steps,
        log_every=rm.logging_steps,
        checkpoint_every=rm.checkpoint_every,
        samplers={"batches": batches},
        stopper=stopper_for(rm.early_stopping),
        evaluate=evaluating(model, lambda: evaluate_pairs(model, head, tokenization, held)),
    )
    loop.resume()

    def train_step(step: int, log: bool) -> dict[str, float] | None:
        batch = dist.shard([train[i] for i in batches.next()])  # every rank draws the global batch, trains its share
        chosen, rejected = score_pairs(model, head, tokenization, batch)
        loss = pairwise_reward_loss(chosen, rejected)
        updater.step(loss, what=f"reward loss at step {step}")
        if not log:
            return None
        accuracy = (chosen > rejected).float().mean().item()
        return {"loss": round(dist.mean(loss.item()), 5), "accuracy": dist.mean(accuracy)}

    model.train()
    history = loop.run(train_step)
    model.eval()
    metrics = evaluate_pairs(model, head, tokenization, held)
    probes = probe_scores(model, head, tokenization, held[:8])

    with gathered(dist, updater.module, also=[head.bias]):
        save_adapter(model, ADAPTER_NAME, out / "adapter")
        save_head(head, out / SCORE_HEAD, backbone.fingerprint)
    write_json(out / PROBES, probes)
    write_json(out / "history.json", history)
    return {
        **metrics,
        "warnings": learning.warnings(history, rm.warmup_steps),
        "train_loss": history[-1]["loss"],
        "train_pairs": len(train),
        "eval_pairs": len(held),  # the pairs pair_accuracy is measured on
        "held_out_pairs": len(held_out),  # of these held-out ones (reward.eval_max_pairs)
        "trainable_parameters": trainable,
        "resumed_from_step": loop.start,
        **loop.stopping_metrics(),
    }


class EpochBatches:
    """Indices of successive batches of ``batch_size`` out of ``count`` items: shuffled epochs, and a batch
    may straddle two epochs. Its state (generator and the rest of the epoch) resumes exactly."""

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        self.count, self.batch_size = count, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> list[int]:
        if len(self.order) < self.batch_size:
            self.order += torch.randperm(self.count, generator=self.generator, device="cpu").tolist()
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
