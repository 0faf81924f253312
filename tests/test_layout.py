"""The layout's import rules: the flow side never loads torch, and a recipe's import stays light (the
memory plan imports recipes for their phases)."""

import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes")


def _heavy_after_importing(modules: list[str]) -> list[str]:
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return [m for m in result.stdout.strip().split(",") if m]


def test_no_flows_module_imports_torch() -> None:
    modules = [f"flows.{path.stem}" for path in sorted((REPO / "flows").glob("*.py")) if path.stem != "__init__"]
    assert len(modules) >= 10 and _heavy_after_importing(modules) == []


def test_stage_specs_and_the_stage_entry_import_without_torch() -> None:
    """``rlhf plan`` and the config read every stage's spec, and a stage process sets itself up in
    ``stages.training.entry`` before its recipe loads torch."""
    from stages.registry import STAGES

    specs = [f"stages.{stage.name}.spec" for stage in STAGES]
    assert _heavy_after_importing([*specs, "stages.training.entry", "stages.io.config"]) == []
