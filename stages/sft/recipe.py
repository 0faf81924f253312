"""Supervised fine-tuning: train the ``sft`` adapter on prompt/completion demonstrations with TRL.

    python -m stages.training.entry sft --out runs/manual/sft [--config configs/default.yaml] [--set sft.max_steps=20]

Reads the frozen backbone, attaches one adapter of the configured kind, measures ``task_score`` of the
base, trains with TRL's ``SFTTrainer`` (loss on completion tokens only), measures ``task_score`` again and
writes ``adapter/`` (a standard PEFT folder), ``history.json`` (the training log) and the metrics.

SFTTrainer gets the demonstrations as the rows it would prepare itself (``training_rows``: ``input_ids``
and ``labels``, cut to ``sft.max_length``), built once per dataset, tokenization and length from the
dataset store's token ids, so SFT trains on exactly the ids the reward model, the RL stages and
evaluation use for the same (prompt, completion): chat template, BOS and end token included.

Checkpoints are the HF Trainer's own, every ``sft.checkpoint_every`` steps, in ``.sft.checkpoints/``
beside the artifact, tagged with the stage's cache key; a rerun resumes from the newest complete one.
Under ``launcher: accelerate`` the Trainer runs on the DeepSpeed engine (``distributed.deepspeed``);
both through ``stages.training.hf_trainer``, which DPO shares.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from datasets.table import InMemoryTable
from trl import SFTConfig, SFTTrainer, pack_dataset

from stages.io.artifacts import write_json
from stages.io.config import PipelineConfig
from stages.io.data import LengthReport, Record, list_lengths, load_measured, measured, stored_dataset
from stages.io.dataset_store import TOKENS_SCHEMA, tokenized_batch
from stages.io.samples import write_samples
from stages.model.adapters import RankAllocation, attach_adapter, count_trainable, save_adapter
from stages.model.backbone import stage_backbone
from stages.model.probes import save_probe
from stages.model.tokenization import Tokenization
from stages.training import runner
from stages.training.checkpoints import checkpoint_root
from stages.training.distributed import Distributed, gathered, synced_generation
from stages.training.early_stopping import evaluating, not_stopping, stopper_for
from stages.training.evaluation import held_out_loss, scored_samples, task_score
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


def training_rows(tokens: pa.Table | pa.RecordBatch, max_length: int) -> pa.Table:
    """SFT's training rows from a dataset's token table (``stages.io.dataset_store``; one response per
    record): ``input_ids`` (prompt ids, then completion ids with its end token) and ``labels`` (-100 on
    the prompt), cut to the first ``max_length`` ids, and without the rows that keep no completion id.

    Exactly what TRL 1.16's ``SFTTrainer`` prepares from ``input_ids`` + ``completion_mask`` with
    ``completion_only_loss`` (its labels, ``truncation_mode='keep_start'`` and its drop of fully masked
    rows; ``tests/test_bad_inputs.py`` compares the two), but in numpy over whole columns: TRL maps
    row by row in Python, which took minutes for 200k demonstrations (issue 31).
    """
    if isinstance(tokens, pa.Table):
        tokens = (
            tokens.combine_chunks().to_batches()[0]
            if tokens.num_rows
            else pa.RecordBatch.from_pylist([], tokens.schema)
        )
    prompt = tokens.column("prompt_ids")
    completion = pc.list_flatten(tokens.column("response_ids"))
    prompt_len, completion_len = list_lengths(prompt), list_lengths(completion)
    keep_prompt = np.minimum(prompt_len, max_length)
    keep_completion = np.minimum(completion_len, max_length - keep_prompt)
    kept = keep_completion > 0
    out_len = np.where(kept, keep_prompt + keep_completion, 0)
    out_start = np.concatenate([[0], np.cumsum(out_len)])
    input_ids = np.empty(out_start[-1], dtype=np.int32)
    labels = np.empty(out_start[-1], dtype=np.int32)
    for column, keep, shift, masked in (
        (prompt, keep_prompt, np.zeros_like(keep_prompt), True),
        (completion, keep_completion, keep_prompt, False),
    ):
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        lengths = list_lengths(column)
        row = np.repeat(np.arange(len(lengths)), lengths)
        position = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        take = (position < keep[row]) & kept[row]
        where = out_start[row[take]] + shift[row[take]] + position[take]
        input_ids[where] = values[take]
        labels[where] = -100 if masked else values[take]
    offsets = pa.array(np.concatenate([[0], out_start[1:][kept]]), type=pa.int32())
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(input_ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
        }
    )


@cache
def _rows_version() -> str:
    """What ``training_rows`` depends on besides the ids: this file's code and TRL's version (whose
    preparation it reproduces), so a fix to either builds the rows again."""
    import trl

    return hashlib.sha256(Path(__file__).read_bytes() + trl.__version__.encode()).hexdigest()[:12]


def sft_dataset(demos: list[Record], tokenization: Tokenization, max_length: int, packing: bool = False) -> Dataset:
    """``training_rows`` of demonstrations held in memory (a stage reads them from the dataset store),
    ``packed`` when ``packing``."""
    tokens = pa.table(tokenized_batch(demos, ("completion",), tokenization), schema=TOKENS_SCHEMA)
    rows = Dataset(InMemoryTable(training_rows(tokens, max_length)))
    return packed(rows, max_length) if packing else rows


def packed(rows: Dataset, max_length: int) -> Dataset:
    """TRL's best-fit-decreasing packing of training rows (``trl.pack_dataset``, strategy ``bfd``): whole
    rows, longest first, into rows of at most ``max_length`` ids, with their ``seq_lengths``, from which
    TRL's padding-free collator gives each row its own positions (0, 1, ...) and masks the label at each
    row's start, so no loss crosses a boundary and attention stays within each row (transformers builds
    the block-diagonal mask from the positions). Deterministic: the same rows pack the same way."""
    return pack_dataset(rows, max_length, strategy="bfd")


def build_sft_trainer(
    model: PeftModel,
    tokenization: Tokenization,
    rows: Dataset,
    cfg: PipelineConfig,
    checkpoints: Path,
    dist: Distributed,
) -> SFTTrainer:
    """TRL's SFTTrainer on ``training_rows`` (``input_ids``, ``labels``): its preparation is skipped, since
    the rows are already its prepared rows."""
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
        {"train_dataset": rows},
        RankAllocation.of(model),
        max_length=cfg.sft.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=cfg.sft.packing,  # with the rows ``packed``: TRL's padding-free collator
        padding_free=cfg.sft.packing,
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
    demos = stored_dataset(cfg.data.sft, "sft", cfg.task)
    _warn_if_too_long(measured(demos, tokenization, cfg.sft.max_length), dist)
    rows = demos.derived(  # a record batch at a time: a file larger than memory never is in memory
        f"sft-rows-{tokenization.fingerprint}-{cfg.sft.max_length}-{_rows_version()}",
        lambda: (training_rows(batch, cfg.sft.max_length) for batch in demos.tokens(tokenization).to_batches()),
    )
    held_out, _ = load_measured(cfg.data, "eval", cfg.task, tokenization, backbone.model.config.max_position_embeddings)

    score_before, samples_before = scored_samples(
        backbone.model, tokenization, held_out, cfg.eval, cfg.run.seed, phase="before", step=0, desc="task_score (base)"
    )
    model = attach_adapter(backbone.model, cfg.adapter, ADAPTER_NAME, total_steps=cfg.sft.max_steps)
    trainable = count_trainable(model)  # before ZeRO-3 partitions the parameters
    learning = LearningCheck(
        model, dist, stage="sft", adapter_kind=cfg.adapter.kind, learning_rate=cfg.sft.learning_rate
    )
    root = checkpoint_root(ctx.final)
    resume = agreed_resume_point(root, ctx.cache_key, dist, "sft")
    dataset = Dataset.from_file(str(rows))
    trainer = build_sft_trainer(
        model, tokenization, packed(dataset, cfg.sft.max_length) if cfg.sft.packing else dataset, cfg, root, dist
    )
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
    score_after, samples_after = scored_samples(
        model,
        tokenization,
        held_out,
        cfg.eval,
        cfg.run.seed,
        phase="final",
        step=trainer.state.global_step,
        desc="task_score (sft)",
        synced=synced_generation(dist),
    )
    write_samples(out, samples_before + samples_after)

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
