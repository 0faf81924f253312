"""The layout's import rules: the flow side never loads torch, a recipe's import stays light (the
memory plan imports recipes for their phases), and the flows modules import each other without a circle
and without reaching for another module's private names."""

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from graphlib import CycleError, TopologicalSorter

import pytest

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


def test_recipes_import_without_torch() -> None:
    from stages.registry import STAGES

    assert _heavy_after_importing([stage.module for stage in STAGES]) == []



def _imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import of a module, at its top and inside functions, but none under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from _imports(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(ast.iter_child_nodes(node))


def _flows_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """``{flows module: [(imported module, names taken from it), ...]}`` for every ``flows/*.py``."""
    graph: dict[str, list[tuple[str, list[str]]]] = {}
    for path in sorted((REPO / "flows").glob("*.py")):
        found = []
        for node in _imports([ast.parse(path.read_text(), str(path))]):
            if isinstance(node, ast.Import):
                found += [(alias.name, []) for alias in node.names]
            elif node.level == 0 and node.module:
                names = [alias.name for alias in node.names]
                found.append((node.module, names))
                found += [(f"{node.module}.{name}", []) for name in names]  # `from flows import cli`
        graph[f"flows.{path.stem}"] = found
    return graph


def test_flows_modules_import_each_other_without_a_circle() -> None:
    """Imports inside functions count: a circle through a function's import is still a circle (and one of
    the code versions of the cache key)."""
    imported = _flows_imports()
    edges = {module: {m for m, _ in found if m in imported and m != module} for module, found in imported.items()}
    assert "flows.run_dir" in edges["flows.promotion"] and "flows.pipeline" in edges["flows.sweep"]  # top, in function
    try:
        tuple(TopologicalSorter(edges).static_order())
    except CycleError as err:
        pytest.fail("import circle (A -> B: A imports B): " + " -> ".join(reversed(err.args[1])))


def test_no_flows_module_imports_a_private_name_of_another_module() -> None:
    private = [f"{module}: from {source} import {name}" for module, found in _flows_imports().items()
               for source, names in found if source.split(".")[0] in ("flows", "stages")
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert private == []
