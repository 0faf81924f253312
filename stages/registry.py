"""The stage registry: every stage, declared once, in its own folder.

A stage is a folder ``stages/<name>/`` with a torch-free ``spec.py`` (its ``SPEC``: a ``StageSpec``
naming its config section, inputs, datasets, curves, stopping metrics, config checks and memory plan)
and its ``recipe.py`` (``main()`` trains and publishes). Another package adds a stage the same way: an
entry point in the ``rlhf.stages`` group naming its ``StageSpec`` (``PLUGIN_GROUP``). Both kinds go
through one check (``_registered``) into one table.

The pipeline order and the ``run.stages`` choices, the config's sections and dependency checks,
provenance and the cache key (with the stage's own code version), the launcher, the ZeRO-3 launch
refusal, ``rlhf plan``, the CLI's ``rlhf stage`` choices, W&B's step axis and the report's curves all
read this table; ``tests/test_registry.py`` checks that no other module spells out the stage list.

The table is built on first use (``STAGES``, ``STAGE_ORDER``: PEP 562 module attributes), by importing
each spec module, so that importing this module costs nothing and a spec module may import it for
``StageSpec``. This module itself is pure data: no torch, no pydantic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Curve:
    """A history key the HTML report plots, with its title."""

    key: str
    title: str


@dataclass(frozen=True)
class StageSpec:
    """One stage of the chain.

    ``inputs`` are the upstream stages whose artifacts it reads. ``unless_data`` makes an input
    optional: ``{"reward": "ranked"}`` reads the ``ranked`` dataset instead of the reward model when
    ``data.ranked`` is set (RRHF on offline candidates). ``datasets`` are the ``data.*`` kinds it
    always reads; ``sections`` the config sections its result depends on (its cache key).
    """

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    unless_data: dict[str, str] = field(default_factory=dict)
    # Its section's ``reward`` (model | checker | model+checker) says whether it reads the reward stage.
    reward_source: bool = False
    datasets: tuple[str, ...] = ()
    optional_datasets: tuple[str, ...] = ()  # read when configured (``data.prompts``: PPO/RRHF rollouts)
    step_key: str = "step"  # the history's x axis ("update" for PPO)
    samples_while_training: bool = False  # generates from the policy every step: refused under ZeRO-3
    # Below this a P-tuning v2 prefix barely learns (docs/architecture.md, "P-tuning v2 learning rates").
    prefix_min_learning_rate: float = 0.0
    # Peak RSS of the stage process's imports before its model loads, for the memory plan (python,
    # torch, transformers, peft, tokenizers: measured 398 MiB; SFT adds trl and datasets: 510 MiB).
    import_overhead_mib: int = 410
    curves: tuple[Curve, ...] = ()
    # Trains with an HF Trainer (TRL's): its own loop and checkpoints (``stages.training.hf_trainer``), and its
    # own W&B reporting logs the curves (the runner does not).
    hf_trainer: bool = False
    # The recipe the flow launches as ``python -m <module>``: ``main()`` trains and publishes (default
    # ``stages.<name>.recipe``).
    recipe: str | None = None
    # The stage's config section, "module:Class": a pydantic model (extra="forbid", frozen) with a
    # ``launcher`` field; ``stages.io.config.PipelineConfig`` gets one field per stage from it.
    settings: str | None = None
    # Where it runs in the chain: ascending, built-in stages 10-60, a plugin after them by default.
    order: int = 100
    # The held-out metrics its ``early_stopping.metric`` may name (``stages.training.early_stopping``).
    stopping_metrics: tuple[str, ...] = ()
    # ``memory_workload(cfg, data, parallel) -> Workload``: the phases ``rlhf plan`` sizes (torch-free).
    memory_workload: Callable[..., Any] | None = None
    # ``check(cfg)``: rules across sections that only this stage knows; raises ``ValueError`` (one line).
    check: Callable[[Any], None] | None = None

    @property
    def module(self) -> str:
        return self.recipe or f"stages.{self.name}.recipe"

    def identity(self) -> dict[str, Any]:
        """The fields that change what the stage computes: they enter its code version (cache key)."""
        return {
            "name": self.name,
            "module": self.module,
            "sections": list(self.sections),
            "inputs": list(self.inputs),
            "unless_data": self.unless_data,
            "reward_source": self.reward_source,
            "datasets": list(self.datasets),
            "optional_datasets": list(self.optional_datasets),
        }

    def needed_inputs(self, cfg: Any) -> tuple[str, ...]:
        """Upstream artifacts this stage reads under ``cfg`` (an optional one only without its data)."""
        return tuple(i for i in self.inputs if not self._replaced(i, cfg))

    def _replaced(self, upstream: str, cfg: Any) -> bool:
        if upstream == "reward" and self.reward_source and getattr(cfg, self.name).reward == "checker":
            return True
        kind = self.unless_data.get(upstream)
        return kind is not None and getattr(cfg.data, kind) is not None

    def needed_datasets(self, cfg: Any) -> tuple[str, ...]:
        """``data.*`` kinds this stage reads under ``cfg``."""
        configured = (*self.unless_data.values(), *self.optional_datasets)
        return self.datasets + tuple(kind for kind in configured if getattr(cfg.data, kind) is not None)


GENERATIVE = ("backbone", "adapter")  # every stage's result depends on these sections
PLUGIN_GROUP = "rlhf.stages"
SPEC_FILE = "spec.py"  # a folder of stages/ holding one is a stage: its module defines SPEC


def builtin_stages() -> tuple[StageSpec, ...]:
    """The stages of this package: each folder ``stages/<name>/`` with a ``spec.py`` defining ``SPEC``."""
    here = Path(__file__).parent
    found = []
    for folder in sorted(p.parent for p in here.glob(f"*/{SPEC_FILE}")):
        stage = import_module(f"{__package__}.{folder.name}.spec").SPEC
        found.append(_registered(stage, f"{folder}/{SPEC_FILE}", folder.name))
    return tuple(found)


def plugin_stages() -> tuple[StageSpec, ...]:
    """Stages that installed packages add through the ``rlhf.stages`` entry-point group, by name; each
    entry point names a ``StageSpec`` of the same name. Its module is imported when the table is first
    used: at its top it may import ``stages.registry``, ``stages.io.sections``, ``stages.memory.plan``
    and pydantic (the recipe's other imports go in its recipe module, as in the built-in stages)."""
    from importlib.metadata import entry_points

    found = []
    for point in sorted(entry_points(group=PLUGIN_GROUP), key=lambda p: p.name):
        try:
            stage = point.load()
        except ImportError as err:  # most often a spec module that imports torch-side stages.* modules
            raise ImportError(
                f"entry point {point.name} = {point.value} ({PLUGIN_GROUP}): {err}; the module that "
                "holds the StageSpec is imported while the stage table is built, so it may import "
                "stages.registry, stages.io.sections, stages.memory.plan and pydantic at its top, "
                "not the model or training packages"
            ) from err
        found.append(_registered(stage, f"entry point {point.name} = {point.value} ({PLUGIN_GROUP})", point.name))
    return tuple(found)


def _registered(stage: Any, where: str, name: str) -> StageSpec:
    """``stage`` if it is a ``StageSpec`` named ``name`` with its config section; else ``TypeError``."""
    if not isinstance(stage, StageSpec) or stage.name != name or stage.settings is None:
        raise TypeError(f"{where}: expected a StageSpec named {name!r} with its settings (its config section)")
    return stage


@cache
def _table() -> tuple[StageSpec, ...]:
    builtin, plugins = builtin_stages(), plugin_stages()
    for stage in plugins:
        if any(stage.name == b.name for b in builtin):
            raise TypeError(f"entry point {stage.name} ({PLUGIN_GROUP}): stage {stage.name!r} is built in")
    return tuple(sorted(builtin + plugins, key=lambda s: (s.order, s.name)))


def __getattr__(name: str) -> Any:
    """``STAGES`` (every stage, in pipeline order) and ``STAGE_ORDER`` (their names), built on first use."""
    if name == "STAGES":
        return _table()
    if name == "STAGE_ORDER":
        return tuple(stage.name for stage in _table())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def spec(name: str) -> StageSpec:
    """The declaration of stage ``name``; KeyError names the known stages."""
    for stage in _table():
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; known: {', '.join(s.name for s in _table())}") from None


def missing_inputs(stages: list[str], cfg: Any) -> list[str]:
    """One message per configured stage whose upstream stages are not configured (empty when fine)."""
    problems = []
    for name in stages:
        stage = spec(name)
        for needed in stage.needed_inputs(cfg):
            if needed not in stages:
                instead = f", or data.{stage.unless_data[needed]}" if needed in stage.unless_data else ""
                if needed == "reward" and stage.reward_source:
                    instead += f", or {name}.reward=checker"
                problems.append(f"{name} needs the {needed} stage (it reads its artifact){instead}")
    return problems
