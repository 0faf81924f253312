"""DPO (Rafailov et al. 2023): train the policy directly on preference pairs, with no reward model and no
rollouts, using TRL's ``DPOTrainer``, on ONE copy of the frozen backbone.

    python -m stages.training.entry dpo --out runs/manual/dpo --input sft=runs/x/sft

The SFT adapter is loaded twice on the backbone: as ``default``, the policy that trains, and as TRL's
``ref``, a frozen copy that DPOTrainer makes of it and switches to for the reference log-probs (no
second model). Loss: ``dpo.loss_type`` ``sigmoid`` (the paper's eq. 7, strength ``dpo.beta``) or
``ipo`` (Azar et al. 2023, regulariser ``dpo.beta``), plus ``dpo.sft_weight`` times the NLL of the chosen
responses when it is not 0 (RPO; the logged loss then includes it). Pairs that truncation to the
backbone's context leaves identical are dropped and counted (``distinct_after_truncation``).

DPOTrainer tokenizes text itself; here it gets the tokenization contract's ids instead (``prompt_ids``,
``chosen_ids``, ``rejected_ids``), so DPO trains on exactly the ids that SFT, the reward model and
evaluation use for the same (prompt, response): chat template, BOS and end token included.

Metrics: held-out ``task_score`` (with ``task_score_sft``) and the KL to the reference on its samples;
DPO's implicit reward ``beta * log(policy / reference)`` on held-out pairs (whole prompts held out):
``reward_accuracy`` (chosen above rejected) and ``reward_margin``. Checkpoints, resume and DeepSpeed
are the HF Trainer's, as in SFT (``stages.training.hf_trainer``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from datasets import Dataset
from peft import PeftType
from trl import DPOConfig, DPOTrainer

from stages.dpo.pairs import distinct_after_truncation, stored_pair_rows
from stages.io.artifacts import read_manifest, write_json
from stages.io.config import PipelineConfig
from stages.io.data import DataError, evaluation_sample, load_measured, measured, split_indices, stored_dataset
from stages.io.samples import write_samples
from stages.model.adapters import count_trainable, load_adapter, save_adapter, set_trainable
from stages.model.backbone import stage_backbone
from stages.model.probes import save_probe
from stages.model.tokenization import Tokenization
from stages.training import runner
from stages.training.checkpoints import checkpoint_root
from stages.training.distributed import Distributed, gathered, synced_generation
from stages.training.early_stopping import evaluating, not_stopping, stopper_for
from stages.training.evaluation import evaluate_policy, final_evaluation, step_samples
from stages.training.hf_trainer import (
    SampleTables,
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

# DPOTrainer's own names: it trains the adapter named "default" and copies it as "ref" for the reference.
POLICY, REFERENCE = "default", "ref"


@contextmanager
def _reference_config_frozen(model: PeftModel) -> Iterator[None]:
    """DPOTrainer adds its reference with ``add_adapter("ref", <the policy's config>)``, and PEFT's AdaLoRA
    refuses a second adapter that is not in inference mode (it trains one per model). For AdaLoRA the
    policy's config is swapped, while TRL builds, for an inference-mode copy, which the reference keeps."""
    config = getattr(model, "peft_config", {}).get(POLICY)
    if config is None or config.peft_type != PeftType.ADALORA:
        yield
        return
    model.peft_config[POLICY] = replace(config, inference_mode=True)
    try:
        yield
    finally:
        model.peft_config[POLICY] = config


def build_dpo_trainer(
    model: PeftModel,
    tokenization: Tokenization,
    train: list[dict[str, list[int]]],
    held: list[dict[str, list[int]]],
    cfg: PipelineConfig,
    checkpoints: Path,
    dist: Distributed,
) -> DPOTrainer:
    """TRL's DPOTrainer on the contract's ids of the ``train`` and ``held`` pairs (``tokenized_pairs`` rows);
    ``model`` holds the SFT adapter as ``default`` (trainable), and the trainer adds its frozen copy ``ref``
    on the same backbone."""

    class ContractDPOTrainer(DPOTrainer):
        """DPOTrainer fed rows that are already tokenized (its collator's own input format)."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    dpo = cfg.dpo
    datasets = {
        "train_dataset": Dataset.from_list(train),
        "eval_dataset": Dataset.from_list(held),
    }
    trainer = build_trainer(
        ContractDPOTrainer,
        DPOConfig,
        model,
        tokenization.tokenizer,
        dpo,
        cfg,
        dist,
        "dpo",
        checkpoints,
        datasets,
        None,
        _reference_config_frozen(model),  # the SFT adapter keeps the ranks SFT allocated
        per_device_eval_batch_size=dpo.batch_size,
        beta=dpo.beta,
        loss_type=[dpo.loss_type, "sft"] if dpo.sft_weight else [dpo.loss_type],
        loss_weights=[1.0, dpo.sft_weight] if dpo.sft_weight else None,
        max_length=model.get_base_model().config.max_position_embeddings,
        eval_strategy="no",
    )
    if sorted(model.peft_config) != sorted([POLICY, REFERENCE]):  # TRL copies the adapter only under these names
        raise RuntimeError(f"dpo: expected adapters {POLICY!r} and {REFERENCE!r}, found {sorted(model.peft_config)}")
    set_trainable(model, [POLICY])  # before train() builds the optimizer: PEFT adds a prompt-learning copy trainable
    return trainer


def held_out_rewards(trainer: DPOTrainer) -> dict[str, float]:
    """DPO's implicit reward on the held-out pairs: accuracy (chosen above rejected) and mean margin."""
    found = trainer.evaluate()
    return {"reward_accuracy": found["eval_rewards/accuracies"], "reward_margin": found["eval_rewards/margins"]}


def train_dpo(cfg: PipelineConfig, ctx: runner.StageContext) -> dict[str, Any]:
    out, dist, dpo = ctx.staging, ctx.dist, cfg.dpo
    backbone, tokenization = stage_backbone(cfg)
    context = backbone.model.config.max_position_embeddings
    dataset = stored_dataset(cfg.data.preferences, "preferences", cfg.task)
    lengths = measured(dataset, tokenization, context)
    if dist.is_main and (warning := lengths.warning()):
        print(f"warning: {warning}; DPOTrainer keeps the first {context} tokens of each pair", flush=True)
    rows = stored_pair_rows(dataset.tokens(tokenization))  # the ids the run's pre-flight stored
    kept, dropped = distinct_after_truncation(rows, context)
    if dist.is_main and dropped:
        shown = ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else "")
        print(
            f"warning: {dataset.source}: dropped {len(dropped)} of {len(rows)} pairs (records {shown}): chosen "
            f"and rejected are the same in their first {context} tokens, so DPO cannot tell them apart",
            flush=True,
        )
    if not kept:
        raise DataError(
            f"{dataset.source}: no pair's chosen and rejected differ within the "
            f"backbone's {context}-token context; shorten the prompts"
        )
    keys = dataset.table().column("prompt_key").take(pa.array(kept, type=pa.int64())).to_pylist()
    train_at, held_at = split_indices(keys, dpo.eval_fraction, dataset.source, "dpo.eval_fraction")
    train = [rows[kept[i]] for i in train_at]
    held_out_pairs = [rows[kept[i]] for i in held_at]
    held = evaluation_sample(held_out_pairs, dpo.eval_max_pairs, cfg.run.seed)
    held_out, _ = load_measured(cfg.data, "eval", cfg.task, tokenization, context)

    model = load_adapter(backbone.model, ctx.inputs["sft"], POLICY, backbone.fingerprint, trainable=True)
    trainable = count_trainable(model)  # before ZeRO-3 partitions the parameters
    learning = LearningCheck(model, dist, stage="dpo", adapter_kind=cfg.adapter.kind, learning_rate=dpo.learning_rate)
    root = checkpoint_root(ctx.final)
    resume = agreed_resume_point(root, ctx.cache_key, dist, "dpo")
    trainer = build_dpo_trainer(model, tokenization, train, held, cfg, root, dist)
    stopper = stopper_for(dpo.early_stopping)
    if stopper is not None:  # the policy samples (TRL switches to the reference only inside its loss)
        trainer.add_callback(
            stopping_callback(
                stopper,
                evaluating(
                    model,
                    lambda: evaluate_policy(
                        model,
                        tokenization,
                        held_out,
                        cfg.eval,
                        cfg.run.seed,
                        reference=REFERENCE,
                        desc="early stopping",
                        synced=synced_generation(dist),
                    ),
                ),
            )
        )
    tables = SampleTables(
        lambda step: step_samples(
            model, tokenization, held_out, cfg.eval, cfg.run.seed, step=step, synced=synced_generation(dist)
        ),
        cfg.eval.samples_every,
    )
    trainer.add_callback(tables)
    result = train_from(trainer, resume)
    set_trainable(model, [POLICY])  # TRL's switches to the reference leave a prompt-learning copy trainable
    history = logged_history(trainer)
    rewards = held_out_rewards(trainer)
    model.set_adapter(POLICY)  # the policy samples; its reference is the frozen copy
    metrics, final_samples = final_evaluation(
        model,
        tokenization,
        held_out,
        cfg.eval,
        cfg.run.seed,
        reference=REFERENCE,
        step=trainer.state.global_step,
        desc="task_score (dpo)",
        synced=synced_generation(dist),
    )
    write_samples(out, tables.rows + final_samples)

    save_probe(model, tokenization.tokenizer, out)  # every rank: a ZeRO-3 forward needs them all
    with gathered(dist, model):
        save_adapter(model, POLICY, out / "adapter")
    write_json(out / "history.json", history)
    return {
        **metrics,
        "task_score_sft": read_manifest(ctx.inputs["sft"])["metrics"]["task_score"],
        **rewards,
        "warnings": learning.warnings(history, dpo.warmup_steps),
        "train_loss": round(result.training_loss, 4),
        "final_loss": history[-1]["loss"] if history else None,
        "train_pairs": len(train),
        "eval_pairs": len(held),  # the pairs reward_accuracy is measured on
        "held_out_pairs": len(held_out_pairs),  # of these held-out ones (dpo.eval_max_pairs)
        "dropped_pairs": len(dropped),  # chosen = rejected once truncated (distinct_after_truncation)
        "trainable_parameters": trainable,
        "resumed_from_step": resumed_step(resume),
        **(stopper.metrics() if stopper is not None else not_stopping()),
    }
