"""Supervised fine-tuning: train the ``sft`` adapter on prompt/completion demonstrations with TRL.

    python -m stages.training.entry sft --out runs/manual/sft [--config configs/default.yaml] [--set sft.max_steps=20]

Reads the frozen backbone, attaches one adapter of the configured kind, measures ``task_score`` of the
base, trains with TRL's ``SFTTrainer`` (loss on completion tokens only), measures ``task_score`` again and
writes ``adapter/`` (a standard PEFT folder), ``history.json`` (the training log) and the metrics.

SFTTrainer gets the demonstrations pre-tokenized by the tokenization contract (``input_ids`` plus
``completion_mask``, a format TRL accepts), so SFT trains on exactly the ids the reward model, the RL
stages and evaluation use for the same (prompt, completion): chat template, BOS and end token included.

Checkpoints are the HF Trainer's own, every ``sft.checkpoint_every`` steps, in ``.sft.checkpoints/``
beside the artifact, tagged with the stage's cache key; a rerun resumes from the newest complete one.
Under ``launcher: accelerate`` the Trainer runs on the DeepSpeed engine (``distributed.deepspeed``);
both through ``stages.training.hf_trainer``, which DPO shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from stages.io.artifacts import write_json
from stages.io.config import PipelineConfig
from stages.io.data import LengthReport, Record, load_measured
from stages.model.adapters import RankAllocation, attach_adapter, count_trainable, save_adapter
from stages.model.backbone import stage_backbone
from stages.model.probes import save_probe
from stages.model.tokenization import Tokenization
from stages.training import runner
from stages.training.checkpoints import checkpoint_root
from stages.training.distributed import Distributed, gathered, synced_generation
from stages.training.early_stopping import evaluating, not_stopping, stopper_for
from stages.training.evaluation import held_out_loss, task_score
from stages.training.hf_trainer import (
    agreed_resume_point,
    build_trainer,
    logged_history,
    resumed_step,
    stopping_callback,
    train_from,
)
from stages.training.learning_check import LearningCheck

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_NAME = "sft"


def tokenized_demos(demos: list[Record], tokenization: Tokenization) -> list[dict[str, list[int]]]:
    """Demonstrations in TRL's pre-tokenized format: ``input_ids`` (prompt ids then completion ids with its
    end token, ``Tokenization.pair``) and ``completion_mask`` (1 on the completion's tokens)."""
    rows = []
    for demo in demos:
        prompt, completion = tokenization.pair(demo["prompt"], demo["completion"])
        rows.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return rows


def build_sft_trainer(
    model: PeftModel,
    tokenization: Tokenization,
    demos: list[Record],
    cfg: PipelineConfig,
    checkpoints: Path,
    dist: Distributed,
) -> SFTTrainer:
    """TRL's SFTTrainer on the contract's ids of the demonstrations; loss on completion tokens only."""
    return build_trainer(
        SFTTrainer,
        SFTConfig,
        model,
        tokenization.tokenizer,
        cfg.sft,
        cfg,
        dist,
        "sft",
        checkpoints,
        {"train_dataset": Dataset.from_list(tokenized_demos(demos, tokenization))},
        RankAllocation.of(model),
        max_length=cfg.sft.max_length,
        completion_only_loss=True,
    )


def _warn_if_too_long(report: LengthReport, dist: Distributed) -> None:
    if dist.is_main and (warning := report.warning()):
        print(
            f"warning: {warning}; TRL keeps the first sft.max_length tokens (a cut demo loses its EOS) and "
            "drops a demo with no room for its completion",
            flush=True,
        )


def train_sft(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    out, dist = ctx.staging, ctx.dist
    backbone, tokenization = stage_backbone(cfg)
    tokenizer = backbone.tokenizer
    demos, lengths = load_measured(cfg.data, "sft", cfg.task, tokenization, cfg.sft.max_length)
    _warn_if_too_long(lengths, dist)
    held_out, _ = load_measured(cfg.data, "eval", cfg.task, tokenization, backbone.model.config.max_position_embeddings)

    score_before = task_score(backbone.model, tokenization, held_out, cfg.eval, cfg.run.seed, desc="task_score (base)")
    model = attach_adapter(backbone.model, cfg.adapter, ADAPTER_NAME, total_steps=cfg.sft.max_steps)
    trainable = count_trainable(model)  # before ZeRO-3 partitions the parameters
    learning = LearningCheck(
        model, dist, stage="sft", adapter_kind=cfg.adapter.kind, learning_rate=cfg.sft.learning_rate
    )
    root = checkpoint_root(ctx.final)
    resume = agreed_resume_point(root, ctx.cache_key, dist, "sft")
    trainer = build_sft_trainer(model, tokenization, demos, cfg, root, dist)
    stopper = stopper_for(cfg.sft.early_stopping)

    def measure() -> dict[str, float]:  # only the metric early stopping watches: sampling is the slow one
        if stopper.settings.metric == "eval_loss":
            return {"eval_loss": held_out_loss(model, tokenization, held_out, cfg.eval)}
        return {
            "task_score": task_score(
                model,
                tokenization,
                held_out,
                cfg.eval,
                cfg.run.seed,
                desc="early stopping",
                synced=synced_generation(dist),
            )
        }

    if stopper is not None:
        trainer.add_callback(stopping_callback(stopper, evaluating(model, measure)))
    result = train_from(trainer, resume)
    score_after = task_score(
        model, tokenization, held_out, cfg.eval, cfg.run.seed, desc="task_score (sft)", synced=synced_generation(dist)
    )

    save_probe(model, tokenizer, out)  # every rank: a ZeRO-3 forward needs them all
    with gathered(dist, model):
        save_adapter(model, ADAPTER_NAME, out / "adapter")
    tokenizer.save_pretrained(out / "tokenizer")
    history = logged_history(trainer)
    write_json(out / "history.json", history)
    return {
        "warnings": learning.warnings(history, cfg.sft.warmup_steps),
        "task_score_before": score_before,
        "task_score": score_after,
        "train_loss": round(result.training_loss, 4),
        "train_seconds": round(result.metrics["train_runtime"], 2),
        "final_loss": history[-1]["loss"] if history else None,
        "trainable_parameters": trainable,
        "resumed_from_step": resumed_step(resume),
        **(stopper.metrics() if stopper is not None else not_stopping()),
    }
