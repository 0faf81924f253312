"""The stage registry is the one place that lists the stages; everything else derives from it."""

import re
import typing
from pathlib import Path

import pytest

from stages.config import ConfigError, StageName, load_config
from stages.registry import STAGE_ORDER, STAGES, missing_inputs, spec
from tests.conftest import REPO

# Two stage names as neighbouring literals ("sft", "reward" or {"sft": x, "reward": y}): a stage list.
_NAMES = "|".join(STAGE_ORDER)
STAGE_LIST = re.compile(rf"""["']({_NAMES})["'](:[^,\n]+)?\s*,\s*["']({_NAMES})["']""")
# What may still name several stages outside the registry, and why.
ALLOWED = {
    ("stages/config.py", '["sft", "reward", "ppo"]'): "the default chain: a config value, not the stage list",
    ("stages/memory_plan.py", '{"sft": _sft, "reward": _reward'): "memory phases: move into the registry (issue 12)",
}


def test_no_other_module_spells_out_the_stage_list() -> None:
    found = []
    for path in sorted([*REPO.glob("stages/*.py"), *REPO.glob("flows/*.py")]):
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
                                            "ppo needs the reward stage (it reads its artifact)"]
    with pytest.raises(ConfigError, match=r"rrhf needs the reward stage \(it reads its artifact\), or data.ranked"):
        load_config(None, ["run.stages=[sft,rrhf]"])
    with pytest.raises(KeyError, match="unknown stage 'dpo'; known: sft, reward, rrhf, ppo"):
        spec("dpo")


def test_every_stage_has_a_recipe_module_and_a_config_section() -> None:
    from stages.config import PipelineConfig

    for stage in STAGES:
        assert (REPO / Path(*stage.module.split("."))).with_suffix(".py").is_file(), stage.module
        assert stage.name in PipelineConfig.model_fields and stage.name in stage.sections
