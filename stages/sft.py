"""Supervised fine-tuning: train the ``sft`` adapter on prompt/completion demonstrations with TRL.

    python -m stages.sft --out runs/manual/sft [--config configs/default.yaml] [--set sft.max_steps=20]

Reads the frozen backbone, attaches one adapter of the configured kind, measures ``task_score`` of the
base, trains with TRL's ``SFTTrainer`` (loss on completion tokens only), measures ``task_score`` again and
writes ``adapter/`` (a standard PEFT folder), ``history.json`` (the training log) and the metrics.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

from stages import runner
from stages.adapters import attach_adapter, count_trainable, needs_4bit, save_adapter
from stages.artifacts import write_json
from stages.backbone import load_backbone
from stages.config import PipelineConfig
from stages.data import Record, load_records
from stages.evaluation import task_score

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase
    from trl import SFTTrainer

ADAPTER_NAME = "sft"


def build_sft_trainer(model: "PeftModel", tokenizer: "PreTrainedTokenizerBase", demos: list[Record],
                      cfg: PipelineConfig, scratch: str) -> "SFTTrainer":
    """TRL's SFTTrainer on prompt/completion records; loss on completion tokens only (EOS appended by TRL)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=scratch, max_steps=cfg.sft.max_steps, per_device_train_batch_size=cfg.sft.batch_size,
        learning_rate=cfg.sft.learning_rate, warmup_steps=cfg.sft.warmup_steps, lr_scheduler_type="cosine",
        logging_steps=cfg.sft.logging_steps, max_length=cfg.sft.max_length, completion_only_loss=True,
        save_strategy="no", report_to="wandb" if cfg.tracking.backend == "wandb" else "none", use_cpu=True,
        seed=cfg.run.seed, dataloader_num_workers=0,
        # TRL defaults to bf16 autocast, and accelerate leaves the autocast wrapper on model.forward after
        # training: evaluation and saved adapters would then disagree. The backbone's dtype is the dtype.
        bf16=False, fp16=False, gradient_checkpointing=False,
    )
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(demos), processing_class=tokenizer)


def train_sft(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    out = ctx.staging
    backbone = load_backbone(cfg.backbone, quantize_4bit=needs_4bit(cfg.adapter.kind))
    tokenizer = backbone.tokenizer
    demos = load_records(cfg.data.sft, "sft", cfg.task)
    held_out = load_records(cfg.data.eval, "eval", cfg.task)

    score_before = task_score(backbone.model, tokenizer, held_out, cfg.eval, cfg.run.seed, desc="task_score (base)")
    model = attach_adapter(backbone.model, cfg.adapter, ADAPTER_NAME)
    with tempfile.TemporaryDirectory() as scratch:  # trainer state stays out of the artifact
        trainer = build_sft_trainer(model, tokenizer, demos, cfg, scratch)
        result = trainer.train()
    score_after = task_score(model, tokenizer, held_out, cfg.eval, cfg.run.seed, desc="task_score (sft)")

    save_adapter(model, ADAPTER_NAME, out / "adapter")
    tokenizer.save_pretrained(out / "tokenizer")
    history = [row for row in trainer.state.log_history if "loss" in row]
    write_json(out / "history.json", history)
    return {
        "task_score_before": score_before,
        "task_score": score_after,
        "train_loss": round(result.training_loss, 4),
        "final_loss": history[-1]["loss"] if history else None,
        "trainable_parameters": count_trainable(model),
        "adapter_kind": cfg.adapter.kind,
    }


def main(argv: list[str] | None = None) -> None:
    runner.stage_main("sft", train_sft, argv)


if __name__ == "__main__":
    main()
