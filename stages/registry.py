"""The stage registry: everything that is specific to a stage, declared once.

The pipeline order and the ``run.stages`` choices, the config's dependency checks, provenance and the
cache key (with the stage's own code version), the launcher, the ZeRO-3 launch refusal, ``rlhf plan``
(the recipe's ``memory_workload``), the CLI's ``rlhf stage`` choices, W&B's step axis and the report's
curves all read this table; ``tests/test_registry.py`` checks that no other module spells out the
stage list. Adding a stage: a recipe module with ``main()`` and ``memory_workload()``, a config section
and one entry here (docs/architecture.md, "How to add a stage"). Another package can add a stage
without touching this one: an entry point in the ``rlhf.stages`` group naming its ``StageSpec``, whose
``settings`` names its config section (``PLUGIN_GROUP``).

Pure data: no torch, no pydantic, so ``rlhf --help`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # The recipe the flow launches as ``python -m <module>``: ``main()`` trains and publishes, and
    # ``memory_workload(cfg, data, parallel)`` declares its memory phases (default ``stages.<name>``).
    recipe: str | None = None
    # A plugin stage's config section, "module:Class": a pydantic model (extra="forbid", frozen) with a
    # ``launcher`` field. Built-in stages' sections are fields of ``stages.io.config.PipelineConfig``.
    settings: str | None = None

    @property
    def module(self) -> str:
        return self.recipe or f"stages.{self.name}"

    def identity(self) -> dict[str, Any]:
        """The fields that change what the stage computes: they enter its code version (cache key)."""
        return {"name": self.name, "module": self.module, "sections": list(self.sections), "inputs": list(self.inputs),
                "unless_data": self.unless_data, "reward_source": self.reward_source, "datasets": list(self.datasets),
                "optional_datasets": list(self.optional_datasets)}

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


_GENERATIVE = ("backbone", "adapter")  # every stage's result depends on these sections

BUILTIN: tuple[StageSpec, ...] = (
    StageSpec("sft", (*_GENERATIVE, "sft", "eval"), datasets=("sft", "eval"), prefix_min_learning_rate=0.05,
              import_overhead_mib=520, curves=(Curve("loss", "SFT loss"),), hf_trainer=True),
    StageSpec("reward", (*_GENERATIVE, "reward"), datasets=("preferences",), prefix_min_learning_rate=0.01,
              curves=(Curve("accuracy", "reward model accuracy (train batches)"), Curve("loss", "reward model loss"))),
    StageSpec("rrhf", (*_GENERATIVE, "rrhf", "eval"), inputs=("sft", "reward"), unless_data={"reward": "ranked"},
              reward_source=True,
              datasets=("sft", "eval"), optional_datasets=("prompts",), samples_while_training=True,
              prefix_min_learning_rate=0.01,
              curves=(Curve("loss", "RRHF loss"),)),
    StageSpec("ppo", (*_GENERATIVE, "ppo", "eval"), inputs=("sft", "reward"), reward_source=True, datasets=("sft", "eval"),
              optional_datasets=("prompts",),
              step_key="update", samples_while_training=True, prefix_min_learning_rate=0.001,
              curves=(Curve("score", "PPO reward (mean score of rollouts)"), Curve("kl", "PPO KL to reference (per response)"),
                      Curve("entropy", "PPO policy entropy"),
                      Curve("logprob_gap_max", "PPO log-prob gap, sampling vs training (nats, largest)"))),
    StageSpec("dpo", (*_GENERATIVE, "dpo", "eval"), inputs=("sft",), datasets=("preferences", "eval"),
              prefix_min_learning_rate=0.01, import_overhead_mib=520, hf_trainer=True,
              curves=(Curve("loss", "DPO loss"), Curve("rewards/margins", "DPO reward margin (train batches)"),
                      Curve("rewards/accuracies", "DPO reward accuracy (train batches)"))),
    StageSpec("grpo", (*_GENERATIVE, "grpo", "eval"), inputs=("sft", "reward"), reward_source=True,
              datasets=("sft", "eval"), optional_datasets=("prompts",), samples_while_training=True,
              prefix_min_learning_rate=0.001,
              curves=(Curve("reward", "GRPO reward (mean of the sampled groups)"),
                      Curve("kl", "GRPO KL to reference (k3, per token)"), Curve("reward_std", "GRPO reward std within groups"),
                      Curve("logprob_gap_max", "GRPO log-prob gap, sampling vs training (nats, largest)"))),
)
PLUGIN_GROUP = "rlhf.stages"


def plugin_stages() -> tuple[StageSpec, ...]:
    """Stages that installed packages add through the ``rlhf.stages`` entry-point group, by name; each
    entry point names a ``StageSpec`` of the same name. Its module is imported while this registry loads:
    at its top it may import ``stages.registry`` and pydantic only (the recipe's other imports go inside
    its functions, as in the built-in recipes)."""
    from importlib.metadata import entry_points

    found = []
    for point in sorted(entry_points(group=PLUGIN_GROUP), key=lambda p: p.name):
        try:
            stage = point.load()
        except ImportError as err:  # most often a spec module that imports stages.* beyond this registry
            raise ImportError(f"entry point {point.name} = {point.value} ({PLUGIN_GROUP}): {err}; the module that "
                              "holds the StageSpec is imported while this registry loads, so it may import "
                              "stages.registry and pydantic, not other stages.* modules at its top") from err
        if not isinstance(stage, StageSpec) or stage.name != point.name or stage.settings is None:
            raise TypeError(f"entry point {point.name} = {point.value} ({PLUGIN_GROUP}): expected a StageSpec named "
                            f"{point.name!r} with its settings (its config section)")
        if any(stage.name == builtin.name for builtin in BUILTIN):
            raise TypeError(f"entry point {point.value} ({PLUGIN_GROUP}): stage {stage.name!r} is built in")
        found.append(stage)
    return tuple(found)


STAGES: tuple[StageSpec, ...] = BUILTIN + plugin_stages()  # plugins run after the built-in stages
STAGE_ORDER: tuple[str, ...] = tuple(spec.name for spec in STAGES)  # the pipeline order
_BY_NAME = {spec.name: spec for spec in STAGES}


def spec(name: str) -> StageSpec:
    """The declaration of stage ``name``; KeyError names the known stages."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_ORDER)}") from None


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
