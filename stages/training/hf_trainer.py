"""The stages that train with a TRL trainer (SFT: ``SFTTrainer``, DPO: ``DPOTrainer``) on our plumbing.

TRL's trainers bring their own loop, so these stages do not use ``stages.training.loop``. What they
share instead, here:

* the launch arguments: the DeepSpeed engine that ``stages.training.distributed`` set up under
  ``launcher: accelerate``, else the device the backbone was loaded on; never autocast (the backbone's
  dtype is the dtype: with TRL's bf16 autocast, evaluation and the saved adapters would disagree);
* resumable checkpoints: the HF Trainer's own (``.<stage>.checkpoints/checkpoint-N``), tagged with the
  stage's cache key, so a rerun resumes only a run of the same configuration;
* a stop at the first logged NaN/inf loss, before a checkpoint could save its weights;
* the sample tables at logged steps (``SampleTables``), kept with each checkpoint;
* AdaLoRA's rank allocation and checkpoints (``adalora_callbacks``);
* the adapters' own dtype, which TRL casts to bf16 on a 4-bit backbone (``adapter_dtype_kept``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from peft import PeftType
from transformers import TrainerCallback

from stages.io.artifacts import write_json
from stages.io.config import ConfigError, PipelineConfig
from stages.io.progress import progress_mode
from stages.io.samples import Row
from stages.model.adapters import pop_rank_patterns, put_rank_patterns
from stages.model.placement import model_device
from stages.training.distributed import Distributed, filled_deepspeed_config
from stages.training.early_stopping import EarlyStopper, Evaluate
from stages.training.updater import NonFiniteLoss

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import Trainer

    from stages.model.adapters import RankAllocation

KEY_FILE = "cache_key"  # in .<stage>.checkpoints/: whose progress the Trainer checkpoints there are


class TrainerSettings(Protocol):
    """What ``build_trainer`` reads of a stage's section (``SFTSection``, ``DPOSection``)."""

    max_steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    logging_steps: int
    checkpoint_every: int


def build_trainer(
    trainer_class: type[Trainer],
    config_class: type[Any],
    model: PeftModel,
    tokenizer: Any,
    section: TrainerSettings,
    cfg: PipelineConfig,
    dist: Distributed,
    stage: str,
    checkpoints: Path,
    datasets: dict[str, Any],
    allocation: RankAllocation | None,
    constructing: AbstractContextManager[Any] | None = None,
    **options: Any,
) -> Trainer:
    """The one way a stage builds its TRL trainer (``SFTTrainer``, ``DPOTrainer``), in checkpoint folder
    ``checkpoints``: its config (``config_class``) from the stage's ``section`` (steps, batch, learning rate
    on a cosine schedule after warmup, logging and checkpoint steps), the stage's own ``options`` and the
    shared ``trainer_arguments``; refused when one process sees several GPUs; constructed on ``datasets``
    with the adapters' dtype kept (inside ``constructing`` too, when given); checked to run on the
    configured engine with the NaN stop; and with AdaLoRA's callbacks (``allocation``: a fresh adapter's).
    """
    args = config_class(
        output_dir=str(checkpoints),
        max_steps=section.max_steps,
        per_device_train_batch_size=section.batch_size,
        learning_rate=section.learning_rate,
        warmup_steps=section.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=section.logging_steps,
        save_steps=section.checkpoint_every,
        **options,
        **trainer_arguments(model, cfg, dist, stage, micro_batch_size=section.batch_size),
    )
    refuse_data_parallel(args, stage)
    with constructing or nullcontext(), adapter_dtype_kept(model):
        trainer = trainer_class(model=model, args=args, processing_class=tokenizer, **datasets)
    check_engine(trainer, dist, stage)
    adalora_callbacks(trainer, model, allocation)
    return trainer


def trainer_arguments(
    model: PeftModel,
    cfg: PipelineConfig,
    dist: Distributed,
    stage: str,
    *,
    micro_batch_size: int,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """Keyword arguments that every TRL config of a stage shares (``SFTConfig``, ``DPOConfig``): the
    engine or device, W&B on the main rank, the seed, progress bars, and no autocast or checkpointing."""
    if dist.deepspeed is not None:  # the Trainer joins the gloo/DeepSpeed state stages.training.distributed set up
        launch: dict[str, Any] = {
            "deepspeed": filled_deepspeed_config(
                dist,
                micro_batch_size=micro_batch_size,
                gradient_accumulation=1,
                max_grad_norm=max_grad_norm,
                bf16=cfg.backbone.dtype == "bfloat16",
            ),
            "use_cpu": False,
            "accelerator_config": {"use_configured_state": True},
        }
    else:  # the Trainer computes where the backbone was loaded (backbone.device)
        launch = {"use_cpu": model_device(model).type == "cpu"}
    return {
        "report_to": "wandb" if cfg.tracking.backend == "wandb" and dist.is_main else "none",
        "seed": cfg.run.seed,
        "dataloader_num_workers": 0,
        "disable_tqdm": progress_mode() != "bars",
        "max_grad_norm": max_grad_norm,
        "save_strategy": "steps",
        "save_total_limit": 1,
        # TRL defaults to bf16 autocast, and accelerate leaves the autocast wrapper on model.forward after
        # training: evaluation and saved adapters would then disagree. The backbone's dtype is the dtype.
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        **launch,
    }


@contextmanager
def adapter_dtype_kept(model: torch.nn.Module) -> Iterator[None]:
    """Build a TRL trainer inside this block: the trainable parameters come out of it holding exactly the
    tensors they went in with. TRL 1.16's SFTTrainer and DPOTrainer cast a 4-bit model's trainable
    parameters to bf16 in their constructors, whatever ``bf16=`` says (PEFT #2889 / PR #2891), so QLoRA
    adapters trained and saved in bf16 on the float32 backbone, every later load computed logits 7e-3 to
    1e-2 away from the stage's probes, and ``rlhf export`` refused them (issue 29, fault 1). Adapters stay
    fp32 on every backbone dtype, as PEFT's ``autocast_adapter_dtype`` makes them; the optimizer is built
    later, in ``train()``, on the restored tensors."""
    kept = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            if name in kept and param.data.dtype != kept[name].dtype:
                param.data = kept[name]


def refuse_data_parallel(args: Any, stage: str) -> None:
    """A Trainer that sees several GPUs in one process wraps the model in DataParallel and multiplies the
    batch: refused (``rlhf`` shows a local stage one GPU)."""
    if args.n_gpu > 1:
        raise ConfigError(
            f"{stage}: a local stage sees {args.n_gpu} GPUs; run it through `rlhf` (which shows it one) "
            "or set CUDA_VISIBLE_DEVICES to one GPU"
        )


def check_engine(trainer: Trainer, dist: Distributed, stage: str) -> None:
    """The Trainer runs on the configured engine (``use_cpu=True`` with ranks would silently mean DDP),
    and stops at the first non-finite loss it logs."""
    if trainer.is_deepspeed_enabled != (dist.deepspeed is not None):
        raise RuntimeError(f"{stage}: the Trainer's engine is not the configured one ({dist.engine})")
    trainer.add_callback(stop_on_non_finite_loss(stage))


def stop_on_non_finite_loss(stage: str) -> TrainerCallback:
    """Raise at the first logged NaN/inf loss. ``checkpoint_every`` is a multiple of ``logging_steps``
    (config validation), so a non-finite loss is seen before any checkpoint could save its weights."""
    import math

    class StopOnNonFiniteLoss(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
        ) -> None:
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"{stage} loss is {loss} at step {state.global_step}: stopped; the last checkpoint "
                    f"is kept (lower {stage}.learning_rate, or check the data)"
                )

    return StopOnNonFiniteLoss()


def sidecar(args: Any, name: str, step: int, suffix: str) -> Path:
    """A callback's state for checkpoint ``step``, beside the Trainer's checkpoints: ``<name>-<step><suffix>``.

    Written in ``on_step_end`` of a step that saves a checkpoint (``control.should_save``, set by the
    Trainer's flow callback, which runs first): before the Trainer writes that checkpoint's
    ``trainer_state.json``, the file that makes it complete (``resumable_checkpoint``), so a complete
    checkpoint always has its sidecars. Read back in ``on_train_begin`` of a resumed Trainer."""
    return Path(args.output_dir) / f"{name}-{step}{suffix}"


def drop_orphan_sidecars(args: Any, name: str, suffix: str) -> None:
    """Remove the sidecars whose checkpoint the Trainer rotated away (``save_total_limit``)."""
    for old in Path(args.output_dir).glob(f"{name}-*{suffix}"):
        step = old.name.removeprefix(f"{name}-").removesuffix(suffix)
        if not (old.parent / f"checkpoint-{step}").is_dir():
            old.unlink()


def adalora_callbacks(trainer: Trainer, model: PeftModel, allocation: RankAllocation | None) -> None:
    """What AdaLoRA adapters need from the Trainer (nothing is added for other kinds).

    * A fresh adapter's ``allocation`` runs in ``on_optimizer_step``, with the update's 1-based number:
      PEFT's ``update_and_allocate`` must come after ``optimizer.step()`` and before the gradients are
      zeroed. Its importance averages are a ``sidecar`` of each checkpoint (``rank_allocation-<step>.pt``).
    * Checkpoints keep the adapters' current shapes: the rank patterns are taken off from
      ``on_step_end`` to ``on_save`` (``pop_rank_patterns``), and off for a resume's load (``train_from``)
      until ``on_train_begin``, which puts them back, a fresh adapter's from its saved allocation.
    """
    configs = getattr(model, "peft_config", {})  # a plain model (tests of the data path) has none
    if not any(config.peft_type == PeftType.ADALORA for config in configs.values()):
        return
    loaded = {name: config.rank_pattern for name, config in model.peft_config.items()}  # an earlier stage's

    class AdaLoraCheckpoints(TrainerCallback):
        saving: dict[str, dict] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 0:
                return
            if allocation is None:
                put_rank_patterns(model, {name: p for name, p in loaded.items() if p is not None})
            else:
                allocation.load_state_dict(
                    torch.load(sidecar(args, "rank_allocation", state.global_step, ".pt"), weights_only=False)
                )

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if allocation is not None:
                allocation.after_update(state.global_step + 1)  # global_step counts the updates before this

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not control.should_save:  # set by the Trainer's flow callback, which runs first
                return
            if allocation is not None and state.is_world_process_zero:
                drop_orphan_sidecars(args, "rank_allocation", ".pt")
                torch.save(allocation.state_dict(), sidecar(args, "rank_allocation", state.global_step, ".pt"))
            self.saving = pop_rank_patterns(model)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            put_rank_patterns(model, self.saving)

    trainer.add_callback(AdaLoraCheckpoints())


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


def agreed_resume_point(root: Path, cache_key: str, dist: Distributed, stage: str) -> str | None:
    """The checkpoint every rank resumes from: the main rank decides (``resumable_checkpoint``)."""
    resume = resumable_checkpoint(root, cache_key) if dist.is_main else None
    resume = dist.gather([resume])[0]
    if resume:
        print(f"{stage}: resuming from {resume}", flush=True)
    return resume


def train_from(trainer: Trainer, resume: str | None) -> Any:
    """``trainer.train()`` from the checkpoint ``resume`` (None: from the start); returns its TrainOutput.

    TRL's trainers count the tokens they trained on (their logs' ``num_tokens``) from 0 in every new
    trainer, a resumed one too (trl 1.16: ``_total_train_tokens``, set in ``__init__``, not checkpointed).
    It starts from the checkpoint's last logged count, so a resumed history equals an uninterrupted one;
    the checkpoint step is always a logging step (``checkpoint_every`` is a multiple of ``logging_steps``).
    """
    import json

    if resume:
        pop_rank_patterns(trainer.model)  # load at the checkpoint's shapes; adalora_callbacks puts them back
    if resume and hasattr(trainer, "_total_train_tokens"):
        rows = json.loads((Path(resume) / "trainer_state.json").read_text())["log_history"]
        logged = [row["num_tokens"] for row in rows if "num_tokens" in row]
        if logged:
            trainer._total_train_tokens = logged[-1]
    return trainer.train(resume_from_checkpoint=resume)


def resumed_step(resume: str | None) -> int:
    """The step a run resumed from (0: it started fresh)."""
    return int(resume.rsplit("-", 1)[1]) if resume else 0


def logged_history(trainer: Trainer) -> list[dict[str, Any]]:
    """The Trainer's training log: its rows with a loss (not the final summary or evaluation rows)."""
    return [row for row in trainer.state.log_history if "loss" in row]


def stopping_callback(stopper: EarlyStopper | None, evaluate: Evaluate) -> TrainerCallback | None:
    """Early stopping for an HF Trainer stage (SFT, DPO): evaluates in ``on_step_end`` every
    ``eval_every`` steps and sets ``should_training_stop`` (and no checkpoint at that step); the stopper's
    state is a ``sidecar`` of each checkpoint (``early_stopping-<step>.json``), read back when the Trainer
    resumes."""
    if stopper is None:
        return None
    import json

    class EarlyStopping(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step > 0:
                stopper.load_state_dict(
                    json.loads(sidecar(args, "early_stopping", state.global_step, ".json").read_text())
                )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % stopper.eval_every == 0 and stopper.update(
                state.global_step, evaluate()[stopper.settings.metric], last=state.global_step >= state.max_steps
            ):
                # No checkpoint at the stop step, as in our loops: the Trainer cannot be told to train no
                # step on resume, so a stage killed before it publishes replays from the checkpoint before
                # and stops here again, instead of training past the stop.
                control.should_training_stop, control.should_save = True, False
            if control.should_save and state.is_world_process_zero:  # set by the flow callback, which runs first
                drop_orphan_sidecars(args, "early_stopping", ".json")
                write_json(sidecar(args, "early_stopping", state.global_step, ".json"), stopper.state_dict())

    return EarlyStopping()


class SampleTables(TrainerCallback):
    """The sample tables of an HF Trainer stage (``stages.io.samples``), as ``TrainingLoop`` keeps them for
    our loops: ``samples(step)`` at every ``every``-th step the Trainer logs (``control.should_log``, set by
    its flow callback, which runs first), not after the step training ends at (the final evaluation's table
    is that one); added after the early-stopping callback, which decides that. ``rows`` holds them all; they are a ``sidecar`` of each checkpoint, read back on resume."""

    def __init__(self, samples: Callable[[int], list[Row]], every: int) -> None:
        self.samples, self.every = samples, every
        self.rows: list[Row] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import json

        if state.global_step > 0:
            self.rows = json.loads(sidecar(args, "samples", state.global_step, ".json").read_text())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        logged = step // args.logging_steps  # the logged steps so far: tables come every ``every`` of them
        # Not at the last step, nor where early stopping ends training (a callback before this one): the final
        # evaluation's table is that step's.
        if control.should_log and logged % self.every == 0 and not control.should_training_stop:
            self.rows += self.samples(step)
        if control.should_save and state.is_world_process_zero:
            drop_orphan_sidecars(args, "samples", ".json")
            write_json(sidecar(args, "samples", step, ".json"), self.rows)
