"""A new stage is one folder, or one module of another package: no other edit.

The throwaway stage ``toy`` is added twice: as ``stages/toy/`` in a copy of this repository (the way
a built-in stage is added), and in a temporary folder with a ``.dist-info`` that declares it in the
``rlhf.stages`` entry-point group, exactly as an installed package would. Through the real CLI it
appears in ``rlhf plan``, runs in a chain after SFT (reading SFT's artifact), is cached on a second
run, is retrained when its section changes, and appears in ``rlhf report --json`` with its metrics and
curve.
"""

import filecmp
import json
import os
import shutil
import textwrap
from pathlib import Path

from tests.conftest import REPO, run_cli

# The stage's declaration, torch-free: its config section, its spec and its memory plan.
TOY_SPEC = '''
"""A throwaway stage: reads SFT's manifest, "trains" a counter, publishes metrics and a history."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from stages.memory.plan import Phase, Workload
from stages.registry import Curve, StageSpec


class ToySection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    launcher: Literal["local"] = "local"
    steps: int = 3


def memory_workload(cfg, data, parallel):
    return Workload("toy", 0, 0, (Phase("reading", "forward", 1, 8, 8),))


SPEC = StageSpec("toy", ("toy",), inputs=("sft",), {where}curves=(Curve("loss", "toy loss"),),
                 memory_workload=memory_workload)
'''

# Its recipe: the function the stage process runs (train_<name>).
TOY_RECIPE = """
from stages.io.artifacts import read_manifest, write_json


def train_toy(cfg, ctx):
    history = [{"step": step, "loss": 1.0 / step} for step in range(1, cfg.toy.steps + 1)]
    write_json(ctx.staging / "history.json", history)
    return {"sft_task_score": read_manifest(ctx.inputs["sft"])["metrics"]["task_score"], "steps": cfg.toy.steps}
"""
TOY_STAGE = (
    TOY_SPEC.replace("{where}", 'recipe="toy_stage", settings="toy_stage:ToySection",\n                 ') + TOY_RECIPE
)


def _install_plugin(folder: Path) -> dict[str, str]:
    """The stage module and the metadata an installed package would have; the env that finds them."""
    folder.mkdir()
    (folder / "toy_stage.py").write_text(TOY_STAGE)
    dist = folder / "toy_stage-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-stage\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [rlhf.stages]
        toy = toy_stage:SPEC
    """)
    )
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def test_a_stage_registered_from_outside_runs_caches_plans_and_reports(tmp_path: Path) -> None:
    _runs_caches_plans_and_reports(tmp_path, _install_plugin(tmp_path / "plugin"))


def _add_stage_folder(copy: Path) -> dict[str, str]:
    """A copy of the repository's packages with ``stages/toy/`` added; the env that imports the copy."""
    for package in ("stages", "flows", "configs", "infra"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    folder = copy / "stages" / "toy"
    folder.mkdir()
    (folder / "__init__.py").write_text('"""The toy stage."""\n')
    (folder / "spec.py").write_text(
        TOY_SPEC.replace("{where}", 'settings="stages.toy.spec:ToySection",\n                 ')
    )
    (folder / "recipe.py").write_text(TOY_RECIPE)
    return {"PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")])}


def _changed_files(copy: Path) -> list[str]:
    """The files of the copy that are new or differ from the repository's."""
    changed = []
    for path in sorted(copy.rglob("*.py")):
        original = REPO / path.relative_to(copy)
        if not original.is_file() or not filecmp.cmp(path, original, shallow=False):
            changed.append(str(path.relative_to(copy)))
    return changed


def test_a_new_stage_is_one_folder(tmp_path: Path) -> None:
    """Adding a stage to this package touches exactly one new folder, ``stages/toy/``, and the stage then
    runs, caches, plans and reports like the built-in ones."""
    env = _add_stage_folder(tmp_path / "repo")
    assert _changed_files(tmp_path / "repo") == ["stages/toy/__init__.py", "stages/toy/recipe.py", "stages/toy/spec.py"]
    work = tmp_path / "work"
    work.mkdir()
    _runs_caches_plans_and_reports(work, env)


def _runs_caches_plans_and_reports(tmp_path: Path, env: dict[str, str]) -> None:
    chain = [
        "--set",
        "run.stages=[sft,toy]",
        "--set",
        "sft.max_steps=3",
        "--set",
        "eval.num_prompts=4",
        "--set",
        "tracking.backend=none",
        "--set",
        "toy.steps=4",
    ]

    plan = run_cli("plan", *chain, "--json", cwd=tmp_path, env=env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert list(json.loads(plan.stdout)["stages"]) == ["sft", "toy"]
    assert json.loads(plan.stdout)["stages"]["toy"]["peak_phase"] == "reading"

    first = run_cli("run", *chain, "--run-id", "first", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    second = run_cli("run", *chain, "--run-id", "second", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]

    reports = {}
    for run_id in ("first", "second"):
        result = run_cli("report", run_id, "--json", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        reports[run_id] = json.loads(result.stdout)
    toy = reports["first"]["stages"]["toy"]
    assert toy["status"] == "completed" and toy["metrics"]["steps"] == 4
    assert toy["metrics"]["sft_task_score"] == reports["first"]["stages"]["sft"]["metrics"]["task_score"]
    assert reports["second"]["stages"]["toy"]["status"] == "cached"
    assert reports["second"]["stages"]["sft"]["status"] == "cached"
    assert "toy loss" in (tmp_path / "runs" / "first" / "report.html").read_text()
    assert "toy:" in (tmp_path / "runs" / "first" / "config.yaml").read_text()  # its section, resolved

    changed = run_cli("run", *chain[:-1], "toy.steps=5", "--run-id", "third", cwd=tmp_path, env=env)
    assert changed.returncode == 0, changed.stdout[-2000:] + changed.stderr[-2000:]
    third = json.loads(run_cli("report", "third", "--json", cwd=tmp_path, env=env).stdout)
    assert third["stages"]["sft"]["status"] == "cached" and third["stages"]["toy"]["status"] == "completed"
