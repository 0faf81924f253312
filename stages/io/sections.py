"""The sections of a pipeline config that every stage shares, and the bases of the stages' own sections.

A stage's section (``sft:``, ``ppo:``, ...) lives in its folder (``stages/<name>/spec.py``), built on a
base here: ``StoppableSection`` (early stopping), ``TrainerSection`` (a stage an HF Trainer trains) or
``RewardSourceSection`` (an RL stage's reward). ``stages.io.config`` assembles them all into
``PipelineConfig`` and loads, merges and validates the YAML; the cross-section rules (a stage's inputs,
the gate's stages, AdaLoRA's limits) live there and in each stage's ``check``. Pure pydantic: no heavy
library is imported here, and not the stage registry either (the stages' specs import this module).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stages.io.formats import format_keys
from stages.io.gate import Condition

Launcher = Literal["local", "accelerate"]  # in this process, or `accelerate launch` over distributed.*
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")  # infra/deepspeed/<name>.json
DATA_KINDS = ("sft", "preferences", "eval", "prompts", "ranked")  # the data.* datasets


class Section(BaseModel):
    """A config section: unknown keys are an error, and a loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(Section):
    # Names of registered stages, in pipeline order (``stages.io.config`` narrows the type to them).
    stages: list[str] = Field(default_factory=lambda: ["sft", "reward", "ppo"], min_length=1)
    seed: int = 0
    # Torch threads per local stage process. auto: the cores no other process is using when the stage starts
    # (stages.io.devices.stage_threads); more threads than free cores makes CPU training crawl.
    threads: int | Literal["auto"] = Field(default="auto")

    @field_validator("threads")
    @classmethod
    def _positive_threads(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"run.threads must be 'auto' or at least 1, got {value}")
        return value


# Where a stage computes, not what: left out of the config digest. The device a stage resolves to enters
# its cache key through ``launch_identity`` instead, so ``auto`` and ``cuda`` on one GPU share a cache.
PLACEMENT_KEYS = {"backbone": {"device"}}


class BackboneSection(Section):
    # "builtin:tiny" (built and cached on first use), a hub id ("meta-llama/Llama-3.2-1B") or a local folder.
    name: str = "builtin:tiny"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Where every stage computes (stages.model.placement): auto = CUDA when a GPU is visible, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


QUANTIZED_KINDS = ("qlora",)  # the adapter kinds that train on the backbone loaded in nf4 4-bit


def needs_4bit(kind: str) -> bool:
    """Whether adapter ``kind`` trains on the 4-bit backbone (QLoRA); part of every stage's cache key."""
    return kind in QUANTIZED_KINDS


class AdapterSection(Section):
    # stages.model.adapters: lora, qlora (4-bit backbone), dora (weight-decomposed LoRA), adalora (ranks
    # pruned while training; one trainable adapter per model), ptuning_v2 (prefix tuning).
    kind: Literal["lora", "qlora", "dora", "adalora", "ptuning_v2"] = "lora"
    r: int = Field(default=8, ge=1)  # LoRA rank (AdaLoRA: the initial rank)
    target_r: int = Field(default=4, ge=1)  # AdaLoRA: the average rank its budget prunes to
    alpha: int = Field(default=16, ge=1)  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"  # LoRA targets; "all-linear" skips the LM head
    num_virtual_tokens: int = Field(default=8, ge=1)  # P-tuning v2 prefix length, on every layer

    @model_validator(mode="after")
    def _adalora_prunes(self) -> AdapterSection:
        if self.kind == "adalora" and self.target_r > self.r:
            raise ValueError(f"target_r={self.target_r} is above r={self.r}: AdaLoRA prunes from r down to target_r")
        return self


class TaskSection(Section):
    """The built-in verifiable task: two-number addition, checked exactly."""

    seed: int = 1234
    max_operand: int = Field(default=19, ge=2, le=999)
    num_eval: int = Field(default=64, ge=1)
    num_sft: int = Field(default=512, ge=1)
    num_pairs: int = Field(default=512, ge=1)
    # Share of SFT demonstrations that stop right after the answer. The rest ramble on with another
    # equation, so SFT alone plateaus and RLHF has something to fix.
    demo_accuracy: float = Field(default=0.6, ge=0.0, le=1.0)
    # The harder variant (bench/task-hard.yaml): a share of SFT demonstrations with a wrong sum, which a
    # reward model cannot verify (stages/io/arithmetic.py) but the checker can; and a share of preference
    # pairs with chosen and rejected swapped, so the reward model is imperfect. 0: the default task.
    wrong_answer_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    label_noise: float = Field(default=0.0, ge=0.0, lt=0.5)

    @model_validator(mode="after")
    def _enough_problems(self) -> TaskSection:
        total = (self.max_operand + 1) ** 2
        if self.num_eval >= total:
            raise ValueError(f"num_eval={self.num_eval} leaves no training problems out of {total}")
        return self


class DataSource(Section):
    """A dataset whose columns have other names: ``{source: x.jsonl, columns: {prompt: question}}`` reads
    the file's ``question`` column as the format's ``prompt``."""

    source: str
    columns: dict[str, str] = Field(default_factory=dict)  # the format's key -> the file's column


DataRef = str | DataSource  # "builtin", a .jsonl/.parquet path or "hf:NAME[:SPLIT]", or a DataSource


class DataSection(Section):
    # Formats of each kind: stages/io/formats.py and README "Data formats".
    sft: DataRef = "builtin"
    preferences: DataRef = "builtin"
    eval: DataRef = "builtin"
    # Prompts the RL stages (PPO, RRHF) roll out on; None: the SFT demonstrations' prompts.
    prompts: DataRef | None = None
    # RRHF's offline candidates {"query", "responses", "scores"}; when set, RRHF needs no reward stage.
    ranked: DataRef | None = None
    # Plain-string data through the tokenizer's chat template: auto (only conversational data), always, never.
    chat_template: Literal["auto", "always", "never"] = "auto"

    @model_validator(mode="after")
    def _columns_name_format_keys(self) -> DataSection:
        for kind in DATA_KINDS:
            ref = getattr(self, kind)
            if not isinstance(ref, DataSource) or not ref.columns:
                continue
            if ref.source == "builtin":
                raise ValueError(f"{kind}.columns: the builtin dataset has no columns to map")
            unknown = sorted(set(ref.columns) - format_keys(kind))
            if unknown:
                raise ValueError(
                    f"{kind}.columns: {unknown} are not keys of any {kind} format; "
                    f"map these: {sorted(format_keys(kind))}"
                )
        return self


# What each built-in stage can evaluate while it trains (stages.training.early_stopping).


class EarlyStoppingSection(Section):
    """Stop a stage when a held-out ``metric`` has not improved by more than ``min_delta`` (in the
    direction of ``mode``) for ``patience`` evaluations, one every ``eval_every`` steps."""

    metric: str
    mode: Literal["max", "min"] | None = None  # null: min for a loss or a KL, max for the others
    patience: int = Field(default=3, ge=1)
    min_delta: float = Field(default=0.0, ge=0)
    eval_every: int = Field(default=10, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _mode_of_the_metric(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") is None:
            data = {**data, "mode": "min" if data.get("metric") in ("eval_loss", "kl_to_reference") else "max"}
        return data


class StoppableSection(Section):
    """A stage that can stop early on a held-out metric (its spec's ``stopping_metrics``)."""

    early_stopping: EarlyStoppingSection | None = None  # null: off (the default)


class TrainerSection(StoppableSection):
    """A stage trained by an HF Trainer (TRL) checks its loss for NaN at each log (``hf_trainer``)."""

    logging_steps: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)  # steps between resumable checkpoints

    @model_validator(mode="after")
    def _checkpoints_follow_logs(self) -> TrainerSection:
        if self.checkpoint_every % self.logging_steps:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be a multiple of logging_steps="
                f"{self.logging_steps}, so a NaN loss is caught before a checkpoint saves its weights"
            )
        return self


class RewardSourceSection(StoppableSection):
    """An RL stage's reward (``stages.training.rewards``): the reward model, a checker, or their weighted sum."""

    reward: Literal["model", "checker", "model+checker"] = "model"
    # builtin: the built-in task's checker (1.0 for the exact sum); or "module:function", called with the
    # keywords prompts= and completions= (TRL's reward-function names), returning one float per completion.
    checker: str = "builtin"
    model_weight: float = 1.0  # model+checker: model_weight * reward model + checker_weight * checker
    checker_weight: float = 1.0

    @field_validator("checker")
    @classmethod
    def _checker_is_a_function_name(cls, checker: str) -> str:
        module, colon, function = checker.partition(":")
        if checker != "builtin" and not (colon and module and function.isidentifier()):
            raise ValueError(f"expected builtin or module:function, got {checker!r}")
        return checker


class DistributedSection(Section):
    """How stages with ``launcher: accelerate`` run: DeepSpeed ZeRO through ``accelerate launch``."""

    deepspeed: str = "zero2"  # a preset (zero2 | zero3 | zero3_offload) or the path of a DeepSpeed JSON
    num_processes: int = Field(default=2, ge=1)  # in total, over all machines
    num_machines: int = Field(default=1, ge=1)
    main_process_ip: str | None = None  # needed when num_machines > 1 (the machine running the flow)
    main_process_port: int | None = Field(default=None, ge=1, le=65535)  # None: a free port (one machine only)
    threads_per_process: int = Field(default=1, ge=1)  # OMP threads per rank; more than cores/ranks crawls
    # Seconds the launch waits for every machine to join before failing the stage (never an endless hang).
    join_timeout_s: int = Field(default=600, ge=1)

    @model_validator(mode="after")
    def _multi_node_needs_address(self) -> DistributedSection:
        if self.num_machines > 1 and not (self.main_process_ip and self.main_process_port):
            raise ValueError(
                "num_machines > 1 needs main_process_ip and main_process_port (the machine running the flow)"
            )
        if self.num_processes < self.num_machines:
            raise ValueError(f"num_processes={self.num_processes} is fewer than num_machines={self.num_machines}")
        if self.deepspeed not in DEEPSPEED_PRESETS and not self.deepspeed.endswith(".json"):
            raise ValueError(
                f"choose a preset {list(DEEPSPEED_PRESETS)} or the path of a .json file, got {self.deepspeed!r}"
            )
        return self


class EvalSection(Section):
    num_prompts: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=16, ge=1)
    # Sampled, not greedy: task_score measures the policy RLHF optimises, not its mode.
    temperature: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=64, ge=1)
    # The sample tables (stages/io/samples.py): the first `samples` held-out prompts with the policy's response,
    # its reward and, at the end, the reference's; every `samples_every` logged steps and at the final
    # evaluation. 0: none.
    samples: int = Field(default=4, ge=0)
    samples_every: int = Field(default=1, ge=1)


class TrackingSection(Section):
    backend: Literal["wandb", "none"] = "wandb"
    # Explicit, so nothing waits on a network: offline writes runs/<id>/wandb (upload with `wandb sync`).
    mode: Literal["offline", "online"] = "offline"
    project: str = "rlhf-chain"
    group: str | None = None  # W&B group of the run's stages; null: the run id (`rlhf sweep` sets the sweep's)


class GateSection(Section):
    """Promotion gate (flows/promotion.py): conditions on the stages' final metrics, checked when the run
    finishes, e.g. ``ppo.task_score >= 0.8``, or on the champion's (``ppo.task_score >= champion - 0.02``,
    ``stages.io.gate``). Empty: no gate, and the run is promoted only by hand."""

    conditions: list[str] = Field(default_factory=list)

    @field_validator("conditions")
    @classmethod
    def _parse(cls, conditions: list[str]) -> list[str]:
        for text in conditions:
            Condition.parse(text)
        return conditions
