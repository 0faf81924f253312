"""Typed, validated pipeline configuration.

A config is YAML (``configs/default.yaml`` is the embedded default) plus ``--set key.path=value``
overrides, validated into frozen pydantic models: one per section, the shared ones in
``stages.io.sections`` (re-exported here), each stage's from its spec (``StageSpec.settings``), added to
``PipelineConfig`` from the stage registry. Any unknown key, wrong type or bad value becomes one
``ConfigError`` that names the file and the dotted key, so the CLI can print it and exit non-zero.

Heavy libraries are never imported here: the CLI loads configs before deciding to start torch.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from stages.io.gate import Condition
from stages.io.sections import (  # noqa: F401  # re-exported: callers import the sections from here
    DATA_KINDS,
    DEEPSPEED_PRESETS,
    PLACEMENT_KEYS,
    AdapterSection,
    BackboneSection,
    DataRef,
    DataSection,
    DataSource,
    DistributedSection,
    EarlyStoppingSection,
    EvalSection,
    GateSection,
    Launcher,
    RunSection,
    Section,
    StoppableSection,
    TaskSection,
    TrackingSection,
)
from stages.registry import STAGE_ORDER, STAGES, missing_inputs

DEFAULT_CONFIG_NAME = "default.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class PipelineConfig(Section):
    """The whole config: the shared sections below, plus one section per registered stage (its
    ``StageSpec.settings`` model), added from the registry (``_with_stage_sections``)."""

    run: RunSection = RunSection()
    backbone: BackboneSection = BackboneSection()
    adapter: AdapterSection = AdapterSection()
    task: TaskSection = TaskSection()
    data: DataSection = DataSection()
    eval: EvalSection = EvalSection()
    distributed: DistributedSection = DistributedSection()
    tracking: TrackingSection = TrackingSection()
    gate: GateSection = GateSection()

    @model_validator(mode="after")
    def _stages_have_inputs(self) -> PipelineConfig:
        if problems := missing_inputs(self.run.stages, self):
            raise ValueError(f"run.stages: {'; '.join(problems)}")
        return self

    @model_validator(mode="after")
    def _stopping_metrics_exist(self) -> PipelineConfig:
        for stage in STAGES:
            settings = getattr(getattr(self, stage.name), "early_stopping", None)
            if settings is not None and settings.metric not in stage.stopping_metrics:
                raise ValueError(
                    f"{stage.name}.early_stopping.metric: {stage.name} cannot evaluate {settings.metric!r} "
                    f"while it trains; choose one of {', '.join(stage.stopping_metrics)}"
                )
        return self

    @model_validator(mode="after")
    def _stage_checks(self) -> PipelineConfig:
        for stage in STAGES:  # the rules across sections that only the stage knows
            if stage.check is not None:
                stage.check(self)
        return self

    @model_validator(mode="after")
    def _gate_names_run_stages(self) -> PipelineConfig:
        for text in self.gate.conditions:
            condition = Condition.parse(text)
            named = [condition.stage] + ([condition.champion.stage] if condition.champion else [])
            for stage in named:
                if stage not in self.run.stages:
                    raise ValueError(
                        f"gate.conditions: {text!r} names stage {stage!r}, which is not in run.stages {self.run.stages}"
                    )
        return self

    @model_validator(mode="after")
    def _adalora_limits(self) -> PipelineConfig:
        """PEFT's AdaLoRA trains one adapter per model, its rank budget is scheduled to the last step, and
        its allocator reads each parameter's full ``.grad``, which ZeRO partitions away: refuse what it
        cannot do before anything launches."""
        if self.adapter.kind != "adalora":
            return self
        creating = [s.name for s in STAGES if not s.inputs]  # a new adapter, whose ranks AdaLoRA allocates
        if stopping := [
            s for s in creating if s in self.run.stages and getattr(getattr(self, s), "early_stopping", None)
        ]:
            raise ValueError(
                f"adapter.kind=adalora: {', '.join(stopping)} allocate AdaLoRA's ranks on a schedule that "
                "runs to max_steps; an early stop would publish ranks above adapter.target_r (or never "
                "pruned); set their early_stopping: null, or choose another adapter kind"
            )
        if deepspeed := [
            s for s in self.run.stages if getattr(getattr(self, s, None), "launcher", None) == "accelerate"
        ]:
            raise ValueError(
                f"adapter.kind=adalora: {', '.join(deepspeed)} launch on DeepSpeed, whose ZeRO partitions "
                "the gradients AdaLoRA's rank allocator reads; use launcher: local for them"
            )
        return self

    if TYPE_CHECKING:  # the stages' sections are added from the registry: ``cfg.ppo`` and the like

        def __getattr__(self, name: str) -> Any: ...

    def launcher(self, stage: str) -> str:
        return getattr(self, stage).launcher

    def digest(self, *sections: str) -> str:
        """sha256 of the named top-level sections (all of them when none are named)."""
        names = sections or tuple(type(self).model_fields)
        payload = {
            name: getattr(self, name).model_dump(mode="json", exclude=PLACEMENT_KEYS.get(name)) for name in names
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _with_stage_sections(base: type[PipelineConfig]) -> type[PipelineConfig]:
    """``base`` plus one section per registered stage (its ``StageSpec.settings`` model, at its defaults),
    and ``run.stages`` narrowed to the registered names in pipeline order."""
    from importlib import import_module

    run = _run_section()
    sections: dict[str, Any] = {"run": (run, run())}
    for stage in STAGES:
        if stage.name in base.model_fields or hasattr(base, stage.name):
            raise TypeError(f"stage {stage.name!r}: the config already has a {stage.name!r}; choose another name")
        module, _, name = (stage.settings or "").partition(":")
        model = getattr(import_module(module), name, None)
        if not (isinstance(model, type) and issubclass(model, BaseModel) and "launcher" in model.model_fields):
            raise TypeError(
                f"stage {stage.name!r}: settings {stage.settings!r} must name a pydantic model with a launcher field"
            )
        sections[stage.name] = (model, model())
    return create_model("PipelineConfig", __base__=base, **sections)


def _run_section() -> type[RunSection]:
    """``RunSection`` whose ``stages`` are the registered stages' names, unique and in pipeline order."""
    order = STAGE_ORDER

    class RegisteredRunSection(RunSection):
        stages: list[Literal[order]] = Field(  # type: ignore[valid-type]
            default_factory=lambda: ["sft", "reward", "ppo"], min_length=1
        )

        @model_validator(mode="after")
        def _stages_in_order(self) -> RegisteredRunSection:
            positions = [order.index(s) for s in self.stages]
            if positions != sorted(positions) or len(set(positions)) != len(positions):
                raise ValueError(f"stages must be unique and in pipeline order {list(order)}, got {self.stages}")
            return self

    return RegisteredRunSection


PipelineConfig = _with_stage_sections(PipelineConfig)  # type: ignore[misc]


def default_config_text() -> str:
    return resources.files("configs").joinpath(DEFAULT_CONFIG_NAME).read_text()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load the embedded default, then ``path`` on top, then ``--set`` overrides; validate once."""
    source = "configs/default.yaml (embedded)"
    data = _parse_yaml(default_config_text(), source)
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config: {err.strerror}") from None
        data = _deep_merge(data, _relative_to(Path(path).parent, _parse_yaml(text, source)))
    for item in overrides:
        _apply_override(data, item)
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def _relative_to(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A config file's relative dataset paths, resolved from its own folder when the file is there (as
    ``configs/chat.yaml`` names ``../examples/data/...``); otherwise left to the working directory."""
    section = data.get("data")
    if not isinstance(section, dict):
        return data

    def resolved(value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("source"), str):
            return {**value, "source": resolved(value["source"])}
        if not isinstance(value, str) or value == "builtin" or value.startswith("hf:") or Path(value).is_absolute():
            return value
        beside = folder / value
        return str(beside.resolve()) if beside.is_file() else value

    return {**data, "data": {key: resolved(v) if key in DATA_KINDS else v for key, v in section.items()}}


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``key.path=value``; the value is parsed as YAML so numbers, lists and booleans work."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, for example --set sft.max_steps=20")
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {item!r}: {prefix} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from None


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "<top level>"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in problem and problem["type"] != "missing" and not isinstance(problem["input"], dict):
            message += f" (got {problem['input']!r})"  # not for cross-field checks: their input is a whole section
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)
