"""The stage registry is the one place that lists the stages; everything else derives from it."""

import re
import shutil
import typing
from pathlib import Path

import pytest

from stages.io.config import ConfigError, PipelineConfig, load_config
from stages.io.provenance import code_files, code_version
from stages.registry import STAGE_ORDER, STAGES, missing_inputs, spec
from tests.conftest import REPO

# Two stage names as neighbouring literals ("sft", "reward" or {"sft": x, "reward": y}): a stage list.
_NAMES = "|".join(STAGE_ORDER)
STAGE_LIST = re.compile(rf"""["']({_NAMES})["'](:[^,\n]+)?\s*,\s*["']({_NAMES})["']""")
# What may still name several stages outside the registry, and why.
ALLOWED = {
    ("stages/io/sections.py", '["sft", "reward", "ppo"]'): "the default chain: a config value, not the stage list",
    ("stages/io/config.py", '["sft", "reward", "ppo"]'): "the same default, on the registered stages' type",
}


def test_no_other_module_spells_out_the_stage_list() -> None:
    found = []
    for path in sorted([*REPO.glob("stages/**/*.py"), *REPO.glob("flows/*.py")]):
        relative = str(path.relative_to(REPO))
        if relative == "stages/registry.py" or relative.endswith("/spec.py"):  # the table and its entries
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if STAGE_LIST.search(line) and not any(relative == f and snippet in line for f, snippet in ALLOWED):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_config_choices_order_and_dependencies_come_from_the_registry() -> None:
    stage_name = typing.get_args(PipelineConfig.model_fields["run"].annotation.model_fields["stages"].annotation)[0]
    assert typing.get_args(stage_name) == STAGE_ORDER == tuple(s.name for s in STAGES)
    cfg = load_config(None, ["run.stages=[sft,rrhf]", "data.ranked=builtin"])
    assert spec("rrhf").needed_inputs(cfg) == ("sft",) and spec("rrhf").needed_datasets(cfg) == (
        "sft",
        "eval",
        "ranked",
    )
    assert missing_inputs(["ppo"], cfg) == [
        "ppo needs the sft stage (it reads its artifact)",
        "ppo needs the reward stage (it reads its artifact), or ppo.reward=checker",
    ]
    with pytest.raises(
        ConfigError,
        match=r"rrhf needs the reward stage \(it reads its artifact\), or data.ranked, "
        r"or rrhf.reward=checker",
    ):
        load_config(None, ["run.stages=[sft,rrhf]"])
    with pytest.raises(KeyError, match="unknown stage 'kto'; known: sft, reward, rrhf, ppo, dpo, grpo"):
        spec("kto")
    assert missing_inputs(["dpo"], cfg) == ["dpo needs the sft stage (it reads its artifact)"]


def test_every_stage_is_one_folder_with_its_spec_recipe_and_config_section() -> None:
    for stage in STAGES:
        folder = REPO / "stages" / stage.name
        assert {"__init__.py", "spec.py", "recipe.py"} <= {p.name for p in folder.glob("*.py")}, folder
        assert stage.module == f"stages.{stage.name}.recipe" and stage.memory_workload is not None
        assert stage.name in PipelineConfig.model_fields and stage.name in stage.sections


# The code each stage's result depends on (its code version hashes these files): the shared ground every
# stage stands on, then what each one adds. Pinned, so that an import that widens a stage's cache key
# (and retrains it when an unrelated file changes) is a decision, not an accident.
SHARED_CODE = {
    "__init__.py",
    "io/__init__.py",
    "io/arithmetic.py",
    "io/artifacts.py",
    "io/backbone_files.py",
    "io/builtin_spec.py",
    "io/config.py",
    "io/data.py",
    "io/dataset_store.py",
    "io/deepspeed_config.py",
    "io/devices.py",
    "io/formats.py",
    "io/paths.py",
    "io/provenance.py",
    "io/sections.py",
    "model/__init__.py",
    "model/adapters.py",
    "model/backbone.py",
    "model/builtin_backbone.py",
    "model/heads.py",
    "model/placement.py",
    "model/prompt_sharing.py",
    "model/sequences.py",
    "model/tokenization.py",
    "training/__init__.py",
    "training/checkpoints.py",
    "training/distributed.py",
    "training/early_stopping.py",
    "training/learning_check.py",
    "training/runner.py",
    "training/updater.py",
}
_SAMPLING = {"io/samples.py", "model/generation.py", "model/probes.py", "training/evaluation.py"}
_RL = {
    *_SAMPLING,
    "model/reward_model.py",
    "objectives/__init__.py",
    "objectives/losses.py",
    "training/logprob_gap.py",
    "training/loop.py",
    "training/rewards.py",
}
OWN_CODE = {
    "sft": {*_SAMPLING, "sft/__init__.py", "sft/recipe.py", "training/hf_trainer.py"},
    "reward": {
        "model/reward_model.py",
        "objectives/__init__.py",
        "objectives/losses.py",
        "reward/__init__.py",
        "reward/recipe.py",
        "reward/spec.py",
        "training/loop.py",
    },
    "rrhf": {*_RL, "rrhf/__init__.py", "rrhf/recipe.py", "rrhf/spec.py"},
    "ppo": {*_RL, "objectives/kl_control.py", "ppo/__init__.py", "ppo/recipe.py", "ppo/rollout.py", "ppo/spec.py"},
    "dpo": {*_SAMPLING, "dpo/__init__.py", "dpo/pairs.py", "dpo/recipe.py", "training/hf_trainer.py"},
    "grpo": {*_RL, "grpo/__init__.py", "grpo/recipe.py", "grpo/spec.py"},
}


def _code_sets(root: Path) -> dict[str, set[str]]:
    return {
        stage.name: {str(f.relative_to(root)) for f in code_files(stage.module, {"stages": root}).values()}
        for stage in STAGES
    }


def test_each_stage_is_versioned_by_exactly_its_pinned_code_files() -> None:
    """A stage's code version covers its recipe and what it imports when it runs: not another recipe,
    not sampling for the reward model, not W&B tracking, the promotion gate, the memory plan or
    progress output (they cannot change a result), not imports only for type checking."""
    files = _code_sets(REPO / "stages")
    assert files == {stage: SHARED_CODE | own for stage, own in OWN_CODE.items()}
    assert not {"model/generation.py", "training/tracking.py", "io/gate.py", "training/hf_trainer.py"} & files["reward"]
    recipes = {f"{stage.name}/recipe.py" for stage in STAGES}
    assert all(len(recipes & own) == 1 for own in files.values())  # no recipe imports another


def test_each_stage_is_versioned_by_its_own_code(tmp_path: Path) -> None:
    """Editing RRHF's recipe leaves SFT, reward and PPO cached; editing the reward model's training loop
    leaves PPO, RRHF and GRPO cached, while editing how rewards are scored invalidates all four; editing
    a loss invalidates exactly the stages that import it (SFT trains with TRL's loss, not ours)."""
    copy = tmp_path / "stages"
    shutil.copytree(REPO / "stages", copy, ignore=shutil.ignore_patterns("__pycache__"))

    def versions() -> dict[str, str]:
        code_version.cache_clear()
        return {stage.name: code_version(stage.name, copy) for stage in STAGES}

    def changed_by(edit: str) -> set[str]:
        before = versions()
        with (copy / edit).open("a") as source:
            source.write("\n# an edit\n")
        after = versions()
        return {s for s in before if before[s] != after[s]}

    assert len(set(versions().values())) == len(STAGES)  # no two stages share a version
    assert changed_by("rrhf/recipe.py") == {"rrhf"}
    assert changed_by("reward/recipe.py") == {"reward"}  # the reward stage's training step
    assert changed_by("model/reward_model.py") == {"reward", "rrhf", "ppo", "grpo"}  # how rewards are scored
    assert changed_by("objectives/losses.py") == {"reward", "rrhf", "ppo", "grpo"}
    assert changed_by("training/tracking.py") == set()  # records results, computes none
    code_version.cache_clear()
    assert versions() == versions()  # a digest of the files, not of when it was taken


def test_code_files_follow_relative_imports_and_package_inits(tmp_path: Path) -> None:
    """A plugin package's recipe: relative imports, a parent package's __init__, and the stages it uses."""
    package = tmp_path / "plugin"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inner" / "__init__.py").write_text("from . import helper\n")
    (package / "inner" / "helper.py").write_text("from ..shared import VALUE\n")
    (package / "shared.py").write_text("VALUE = 1\n")
    (package / "inner" / "recipe.py").write_text("from .helper import x\nfrom stages.objectives import losses\n")
    files = code_files("plugin.inner.recipe", {"plugin": package, "stages": REPO / "stages"})
    assert set(files) == {
        "plugin",
        "plugin.inner",
        "plugin.inner.recipe",
        "plugin.inner.helper",
        "plugin.shared",
        "stages",
        "stages.objectives",
        "stages.objectives.losses",
    }


def test_a_plugin_stage_cannot_shadow_a_config_section_or_lack_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.io import config
    from stages.registry import StageSpec

    monkeypatch.setattr(config, "STAGES", (StageSpec("eval", ("eval",), settings="stages.io.config:EvalSection"),))
    with pytest.raises(TypeError, match="the config already has a 'eval'"):
        config._with_stage_sections(config.PipelineConfig)
    monkeypatch.setattr(config, "STAGES", (StageSpec("toy", ("toy",), settings="stages.io.config:EvalSection"),))
    with pytest.raises(TypeError, match="must name a pydantic model with a launcher field"):
        config._with_stage_sections(config.PipelineConfig)
