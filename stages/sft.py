"""Supervised fine-tuning: train the ``sft`` adapter on prompt/completion demonstrations with TRL.

    python -m stages.sft --out runs/manual/sft [--config configs/default.yaml] [--set sft.max_steps=20]

Reads the frozen backbone, attaches one adapter of the configured kind, measures ``task_score`` of the
base, trains with TRL's ``SFTTrainer`` (loss on completion tokens only), measures ``task_score`` again and
writes ``adapter/`` (a standard PEFT folder), ``history.json`` (the training log) and the metrics.

SFTTrainer gets the demonstrations pre-tokenized by the tokenization contract (``input_ids`` plus
``completion_mask``, a format TRL accepts), so SFT trains on exactly the ids the reward model, the RL
stages and evaluation use for the same (prompt, completion): chat template, BOS and end token included.

Checkpoints are the HF Trainer's own, every ``sft.checkpoint_every`` steps, in ``.sft.checkpoints/``
beside the artifact, tagged with the stage's cache key; a rerun resumes from the newest complete one.
Under ``launcher: accelerate`` the Trainer runs on the DeepSpeed engine (``distributed.deepspeed``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.io.artifacts import write_json
from stages.io.config import ConfigError, PipelineConfig
from stages.io.data import LengthReport, Record, load_records, measure_lengths, source_name
from stages.io.progress import progress_mode
from stages.memory.plan import DataShape, Parallel, Phase, Workload, evaluation_sampling
from stages.model.adapters import attach_adapter, count_trainable, needs_4bit, save_adapter
from stages.model.backbone import load_backbone
from stages.model.placement import model_device
from stages.model.probes import save_probe
from stages.model.tokenization import Tokenization
from stages.training import runner
from stages.training.checkpoints import checkpoint_root
from stages.training.distributed import Distributed, filled_deepspeed_config, gathered, synced_generation
from stages.training.evaluation import task_score
from stages.training.learning_check import LearningCheck
from stages.training.updater import NonFiniteLoss

if TYPE_CHECKING:
    from peft import PeftModel
    from trl import SFTTrainer

# TRL's SFTTrainer scores tokens with a fused, chunked LM head (trl.kernels.chunked_logprob): it never
# holds more than a tile of 4096 tokens x 32768 vocabulary entries.
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768
ADAPTER_NAME = "sft"
KEY_FILE = "cache_key"  # in .sft.checkpoints/: whose progress the Trainer checkpoints there are


def tokenized_demos(demos: list[Record], tokenization: Tokenization) -> list[dict[str, list[int]]]:
    """Demonstrations in TRL's pre-tokenized format: ``input_ids`` (prompt ids then completion ids with its
    end token, ``Tokenization.pair``) and ``completion_mask`` (1 on the completion's tokens)."""
    rows = []
    for demo in demos:
        prompt, completion = tokenization.pair(demo["prompt"], demo["completion"])
        rows.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return rows


def build_sft_trainer(model: "PeftModel", tokenization: Tokenization, demos: list[Record],
                      cfg: PipelineConfig, checkpoints: Path, dist: Distributed) -> "SFTTrainer":
    """TRL's SFTTrainer on the contract's ids of the demonstrations; loss on completion tokens only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sft = cfg.sft
    if dist.deepspeed is not None:  # the Trainer joins the gloo/DeepSpeed state stages.training.distributed set up
        launch: dict[str, Any] = {
            "deepspeed": filled_deepspeed_config(dist, micro_batch_size=sft.batch_size, gradient_accumulation=1,
                                                 max_grad_norm=1.0, bf16=cfg.backbone.dtype == "bfloat16"),
            "use_cpu": False, "accelerator_config": {"use_configured_state": True},
        }
    else:  # the Trainer computes where the backbone was loaded (backbone.device)
        launch = {"use_cpu": model_device(model).type == "cpu"}
    args = SFTConfig(
        output_dir=str(checkpoints), max_steps=sft.max_steps, per_device_train_batch_size=sft.batch_size,
        learning_rate=sft.learning_rate, warmup_steps=sft.warmup_steps, lr_scheduler_type="cosine",
        logging_steps=sft.logging_steps, max_length=sft.max_length, completion_only_loss=True,
        save_strategy="steps", save_steps=sft.checkpoint_every, save_total_limit=1, max_grad_norm=1.0,
        report_to="wandb" if cfg.tracking.backend == "wandb" and dist.is_main else "none",
        seed=cfg.run.seed, dataloader_num_workers=0, disable_tqdm=progress_mode() != "bars",
        # TRL defaults to bf16 autocast, and accelerate leaves the autocast wrapper on model.forward after
        # training: evaluation and saved adapters would then disagree. The backbone's dtype is the dtype.
        bf16=False, fp16=False, gradient_checkpointing=False, **launch,
    )
    if args.n_gpu > 1:  # the Trainer would wrap the model in DataParallel and multiply the batch by n_gpu
        raise ConfigError(f"sft: a local stage sees {args.n_gpu} GPUs; run it through `rlhf` (which shows it one) "
                          "or set CUDA_VISIBLE_DEVICES to one GPU")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(tokenized_demos(demos, tokenization)),
                         processing_class=tokenization.tokenizer)
    if trainer.is_deepspeed_enabled != (dist.deepspeed is not None):  # e.g. use_cpu=True silently means DDP
        raise RuntimeError(f"the Trainer's engine is not the configured one ({dist.engine})")
    trainer.add_callback(_stop_on_non_finite_loss())
    return trainer


def _stop_on_non_finite_loss() -> Any:
    """Raise at the first logged NaN/inf loss. ``checkpoint_every`` is a multiple of ``logging_steps``
    (config validation), so a non-finite loss is seen before any checkpoint could save its weights."""
    import math

    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise NonFiniteLoss(f"sft loss is {loss} at step {state.global_step}: stopped; the last checkpoint "
                                    "is kept (lower sft.learning_rate, or check the data)")

    return StopOnNonFiniteLoss()


def resumable_checkpoint(root: Path, cache_key: str) -> str | None:
    """The newest complete Trainer checkpoint of a run with this cache key; stale ones are removed."""
    key_file = root / KEY_FILE
    if key_file.is_file() and key_file.read_text() != cache_key:
        shutil.rmtree(root)  # another configuration's progress: never resume from it
    root.mkdir(parents=True, exist_ok=True)
    key_file.write_text(cache_key)
    # trainer_state.json is the last file the Trainer writes into a checkpoint, so a kill mid-save is skipped.
    complete = [c for c in root.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    newest = max(complete, key=lambda c: int(c.name.split("-")[1]), default=None)
    return str(newest) if newest else None


def _restore_token_count(trainer: "SFTTrainer", checkpoint: Path) -> None:
    """TRL's SFTTrainer counts the tokens it trained on (its logs' ``num_tokens``) from 0 in every new
    trainer, a resumed one too (trl 1.16: ``_total_train_tokens``, set in ``__init__``, not checkpointed).
    Start it from the checkpoint's last logged count, so a resumed history equals an uninterrupted one;
    the checkpoint step is always a logging step (``checkpoint_every`` is a multiple of ``logging_steps``)."""
    import json

    logged = [row["num_tokens"] for row in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
              if "num_tokens" in row]
    if logged and hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = logged[-1]


def _warn_if_too_long(report: LengthReport, dist: Distributed) -> None:
    if dist.is_main and (warning := report.warning()):
        print(f"warning: {warning}; TRL keeps the first sft.max_length tokens (a cut demo loses its EOS) and "
              "drops a demo with no room for its completion", flush=True)


def train_sft(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    out, dist = ctx.staging, ctx.dist
    backbone = load_backbone(cfg.backbone, quantize_4bit=needs_4bit(cfg.adapter.kind))
    tokenizer = backbone.tokenizer
    tokenization = Tokenization.of(tokenizer, cfg.data.chat_template)
    demos = load_records(cfg.data.sft, "sft", cfg.task)
    _warn_if_too_long(measure_lengths(demos, "sft", source_name(cfg.data.sft), tokenization, cfg.sft.max_length), dist)
    held_out = load_records(cfg.data.eval, "eval", cfg.task)
    measure_lengths(held_out, "eval", source_name(cfg.data.eval), tokenization, backbone.model.config.max_position_embeddings)

    score_before = task_score(backbone.model, tokenization, held_out, cfg.eval, cfg.run.seed, desc="task_score (base)")
    model = attach_adapter(backbone.model, cfg.adapter, ADAPTER_NAME)
    trainable = count_trainable(model)  # before ZeRO-3 partitions the parameters
    learning = LearningCheck(model, dist, stage="sft", adapter_kind=cfg.adapter.kind, learning_rate=cfg.sft.learning_rate)
    root = checkpoint_root(ctx.final)
    resume = resumable_checkpoint(root, ctx.cache_key) if dist.is_main else None
    resume = dist.gather([resume])[0]  # the main rank decides, every rank resumes from the same step
    if resume:
        print(f"sft: resuming from {resume}", flush=True)
    trainer = build_sft_trainer(model, tokenization, demos, cfg, root, dist)
    if resume:
        _restore_token_count(trainer, Path(resume))
    result = trainer.train(resume_from_checkpoint=resume)
    score_after = task_score(model, tokenization, held_out, cfg.eval, cfg.run.seed, desc="task_score (sft)",
                             synced=synced_generation(dist))

    save_probe(model, tokenizer, out)  # every rank: a ZeRO-3 forward needs them all
    with gathered(dist, model):
        save_adapter(model, ADAPTER_NAME, out / "adapter")
    tokenizer.save_pretrained(out / "tokenizer")
    history = [row for row in trainer.state.log_history if "loss" in row]
    write_json(out / "history.json", history)
    return {
        "warnings": learning.warnings(history, cfg.sft.warmup_steps),
        "task_score_before": score_before,
        "task_score": score_after,
        "train_loss": round(result.training_loss, 4),
        "train_seconds": round(result.metrics["train_runtime"], 2),
        "final_loss": history[-1]["loss"] if history else None,
        "trainable_parameters": trainable,
        "adapter_kind": cfg.adapter.kind,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else 0,
    }


def memory_workload(cfg: PipelineConfig, data: DataShape, parallel: Parallel) -> Workload:
    """What this stage holds and its phases, for ``rlhf plan`` (``stages.memory.plan``)."""
    rows = min(cfg.sft.batch_size, data.demos)  # the data loader's last batch is never larger than the data
    tokens = min(cfg.sft.max_length, data.demo_tokens)  # TRL truncates at max_length, pads to the longest row
    train = Phase("train step", "train", rows, tokens, min(rows * tokens, TRL_TOKEN_CHUNK), TRL_VOCAB_CHUNK,
                  knobs=("sft.batch_size", "sft.max_length"))
    return Workload("sft", 1, 0, (train, evaluation_sampling(cfg, data, cfg.eval.max_new_tokens, "eval.max_new_tokens")))


def main(argv: list[str] | None = None) -> None:
    runner.stage_main("sft", train_sft, argv)


if __name__ == "__main__":
    main()
