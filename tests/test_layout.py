"""The layout's import rules, read from the code itself (``ast``; imports inside functions count, those
under ``if TYPE_CHECKING:`` do not, as they never run):

* no import circle anywhere in ``stages`` and ``flows``: the import graph is the cache key's
  invalidation graph, and a circle ties every module on it to every other;
* each package imports only the packages below it (``PACKAGE_RULES``): ``io`` never imports ``model``,
  ``flows`` neither ``model`` nor ``training``, no recipe another stage's recipe;
* no module reaches for another module's private (underscore) names;
* the flow side, the config and every stage's spec never load torch, and a stage process sets itself up
  (``stages.training.entry``) before its recipe loads it.
"""

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

import pytest

from stages.io.provenance import runtime_imports
from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes")

# Package -> the project packages its modules may import (besides their own). A stage folder's spec is
# torch-free ground; its recipe stands on every shared package; the tools stand on the recipes.
SHARED = ("io", "memory", "model", "objectives", "training")
PACKAGE_RULES: dict[str, set[str]] = {
    "registry": set(),
    "io": {"registry"},
    "memory": {"io", "registry"},
    "objectives": set(),
    "model": {"io", "objectives"},
    "training": {"io", "model", "objectives", "registry"},
    "spec": {"io", "memory", "registry"},
    "recipe": {"io", "memory", "model", "objectives", "training", "registry", "spec"},
    "tools": {"io", "memory", "model", "objectives", "training", "registry", "spec", "recipe"},
    "flows": {"io", "memory", "registry"},
}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted([*REPO.glob("stages/**/*.py"), *REPO.glob("flows/*.py")]):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """``{module: [(project module it imports, the names it takes), ...]}``."""
    modules = _modules()
    graph: dict[str, list[tuple[str, list[str]]]] = {}
    for name, tree in modules.items():
        package = name if name in ("stages", "flows") or f"{name}.__init__" in modules else name.rpartition(".")[0]
        found = []
        for node in runtime_imports(tree):
            if isinstance(node, ast.Import):
                found += [(alias.name, []) for alias in node.names]
                continue
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((base, [alias.name for alias in node.names]))
            found += [(f"{base}.{alias.name}", []) for alias in node.names]  # `from stages.io import config`
        graph[name] = [(target, names) for target, names in found if target in modules and target != name]
    return graph


def _package(module: str) -> str:
    """The layer of ``module``: a shared package, ``registry``, a stage folder's ``spec`` or ``recipe``
    (its other files count as its recipe), ``tools`` or ``flows``."""
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if len(parts) == 1 or parts[1] == "registry":
        return "registry"
    if parts[1] in (*SHARED, "tools"):
        return parts[1]
    return "spec" if parts[-1] == "spec" else "recipe"


def test_no_import_circle_in_stages_or_flows() -> None:
    edges = {module: {target for target, _ in found} for module, found in _imports().items()}
    assert "flows.run_dir" in edges["flows.promotion"] and "flows.pipeline" in edges["flows.sweep"]  # top, in function
    try:
        tuple(TopologicalSorter(edges).static_order())
    except CycleError as err:
        pytest.fail("import circle (A -> B: A imports B): " + " -> ".join(reversed(err.args[1])))


def test_each_package_imports_only_the_packages_below_it() -> None:
    upward = []
    for module, found in _imports().items():
        layer = _package(module)
        for target, _ in found:
            other = _package(target)
            if other != layer and other not in PACKAGE_RULES[layer]:
                upward.append(f"{module} ({layer}) imports {target} ({other})")
            elif layer == other == "recipe" and module.split(".")[1] != target.split(".")[1]:
                upward.append(f"{module} imports another stage's {target}")
    assert upward == []


def test_no_module_imports_a_private_name_of_another_module() -> None:
    private = [
        f"{module}: from {source} import {name}"
        for module, found in _imports().items()
        for source, names in found
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def _heavy_after_importing(modules: list[str]) -> list[str]:
    code = (
        f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
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
