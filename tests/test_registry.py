"""The stage registry is the one place that lists the stages; everything else derives from it."""

import re
import shutil
import typing
from pathlib import Path

import pytest

from stages.io.config import ConfigError, StageName, load_config
from stages.io.provenance import code_files, code_version
from stages.registry import STAGE_ORDER, STAGES, missing_inputs, spec
from tests.conftest import REPO

# Two stage names as neighbouring literals ("sft", "reward" or {"sft": x, "reward": y}): a stage list.
_NAMES = "|".join(STAGE_ORDER)
STAGE_LIST = re.compile(rf"""["']({_NAMES})["'](:[^,\n]+)?\s*,\s*["']({_NAMES})["']""")
# What may still name several stages outside the registry, and why.
ALLOWED = {
    ("stages/io/sections.py", '["sft", "reward", "ppo"]'): "the default chain: a config value, not the stage list",
}


def test_no_other_module_spells_out_the_stage_list() -> None:
    found = []
    for path in sorted([*REPO.glob("stages/**/*.py"), *REPO.glob("flows/*.py")]):
        relative = str(path.relative_to(REPO))
        if relative == "stages/registry.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if STAGE_LIST.search(line) and not any(relative == f and snippet in line for f, snippet in ALLOWED):
                found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_config_choices_order_and_dependencies_come_from_the_registry() -> None:
    assert typing.get_args(StageName) == STAGE_ORDER == tuple(s.name for s in STAGES)
    cfg = load_config(None, ["run.stages=[sft,rrhf]", "data.ranked=builtin"])
    assert spec("rrhf").needed_inputs(cfg) == ("sft",) and spec("rrhf").needed_datasets(cfg) == ("sft", "eval", "ranked")
    assert missing_inputs(["ppo"], cfg) == ["ppo needs the sft stage (it reads its artifact)",
                                            "ppo needs the reward stage (it reads its artifact), or ppo.reward=checker"]
    with pytest.raises(ConfigError, match=r"rrhf needs the reward stage \(it reads its artifact\), or data.ranked, "
                                          r"or rrhf.reward=checker"):
        load_config(None, ["run.stages=[sft,rrhf]"])
    with pytest.raises(KeyError, match="unknown stage 'kto'; known: sft, reward, rrhf, ppo, dpo, grpo"):
        spec("kto")
    assert missing_inputs(["dpo"], cfg) == ["dpo needs the sft stage (it reads its artifact)"]


def test_every_stage_has_a_recipe_module_and_a_config_section() -> None:
    from stages.io.config import PipelineConfig

    for stage in STAGES:
        assert (REPO / Path(*stage.module.split("."))).with_suffix(".py").is_file(), stage.module
        assert stage.name in PipelineConfig.model_fields and stage.name in stage.sections


def test_each_stage_is_versioned_by_its_own_code(tmp_path: Path) -> None:
    """Editing RRHF's recipe leaves SFT, reward and PPO cached; editing a loss invalidates exactly the
    stages that import it (SFT trains with TRL's loss, not ours)."""
    copy = tmp_path / "stages"
    shutil.copytree(REPO / "stages", copy, ignore=shutil.ignore_patterns("__pycache__"))

    def versions() -> dict[str, str]:
        code_version.cache_clear()
        return {stage.name: code_version(stage.name, copy) for stage in STAGES}

    files = {stage.name: {str(f.relative_to(copy)) for f in code_files(stage.module, {"stages": copy}).values()}
             for stage in STAGES}
    assert "objectives/losses.py" not in files["sft"] and "registry.py" not in files["sft"]
    assert {"model/reward_model.py", "objectives/losses.py", "training/loop.py", "model/adapters.py"} <= files["ppo"]
    assert "reward.py" not in files["ppo"] | files["rrhf"] | files["grpo"]  # no recipe imports another
    assert "rrhf.py" not in files["ppo"] | files["reward"] | files["sft"]
    assert not any(f.startswith("memory/") or f == "io/progress.py" for f in files["ppo"])  # no effect on results

    before = versions()
    assert len(set(before.values())) == len(before)  # no two stages share a version
    with (copy / "rrhf.py").open("a") as recipe:
        recipe.write("\n# an edit\n")
    after_recipe = versions()
    assert {s for s in before if before[s] != after_recipe[s]} == {"rrhf"}
    with (copy / "objectives" / "losses.py").open("a") as losses:
        losses.write("\n# an edit\n")
    after_loss = versions()
    assert {s for s in before if after_recipe[s] != after_loss[s]} == {"reward", "rrhf", "ppo", "grpo"}
    code_version.cache_clear()
    assert versions() == after_loss  # a digest of the files, not of when it was taken


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
    assert set(files) == {"plugin", "plugin.inner", "plugin.inner.recipe", "plugin.inner.helper", "plugin.shared",
                          "stages", "stages.objectives", "stages.objectives.losses"}


def test_a_plugin_stage_cannot_shadow_a_config_section_or_lack_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.io import config
    from stages.registry import StageSpec

    monkeypatch.setattr(config, "STAGES", (StageSpec("eval", ("eval",), settings="stages.io.config:EvalSection"),))
    with pytest.raises(TypeError, match="the config already has a 'eval'"):
        config._with_plugin_sections(config.PipelineConfig)
    monkeypatch.setattr(config, "STAGES", (StageSpec("toy", ("toy",), settings="stages.io.config:EvalSection"),))
    with pytest.raises(TypeError, match="must name a pydantic model with a launcher field"):
        config._with_plugin_sections(config.PipelineConfig)
