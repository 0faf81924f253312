"""What a stage's result depends on, and the cache key derived from it.

The same function serves the flow (to decide whether a stage can be skipped, without importing torch)
and the stage itself (to write its manifest), so the two can never disagree about a key.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from stages.io import artifacts
from stages.io.backbone_files import backbone_fingerprint, has_chat_template
from stages.io.config import ConfigError, PipelineConfig
from stages.io.data import DataError, DataKind, check_split, dataset_digest, stored_dataset
from stages.io.deepspeed_config import launch_identity
from stages.io.sections import needs_4bit
from stages.registry import spec

# Libraries whose version changes numerics enough to invalidate cached results.
_VERSIONED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "deepspeed")


def stage_inputs(stage: str, cfg: PipelineConfig) -> tuple[str, ...]:
    """Upstream artifacts a stage reads (the registry's; e.g. RRHF on offline ranked data needs no reward)."""
    return spec(stage).needed_inputs(cfg)


def stage_datasets(stage: str, cfg: PipelineConfig) -> tuple[DataKind, ...]:
    """``data.*`` kinds a stage reads (the registry's)."""
    return spec(stage).needed_datasets(cfg)  # type: ignore[return-value]


def check_datasets(cfg: PipelineConfig) -> None:
    """Load and validate every dataset the configured stages read; raises ``DataError`` on the first bad
    row, and when the chain's prompts cannot all be tokenized one way: conversational data (or
    ``data.chat_template: always``) for a tokenizer without a template, conversational data under
    ``never``, or, under ``auto``, conversational prompts in one dataset and plain ones in another (the
    reward model would be trained on templated text and score plain rollouts, or the reverse)."""
    kinds = {kind for stage in cfg.run.stages for kind in stage_datasets(stage, cfg)}
    conversational, plain = [], []
    for kind in sorted(kinds):
        has_conversational, has_plain = stored_dataset(getattr(cfg.data, kind), kind, cfg.task).prompt_styles()
        if has_conversational:
            conversational.append(f"data.{kind}")
        if has_plain:
            plain.append(f"data.{kind}")
    if (conversational or cfg.data.chat_template == "always") and has_chat_template(cfg.backbone) is False:
        why = f"{', '.join(conversational)} hold conversational rows" if conversational else "data.chat_template=always"
        raise DataError(
            f"{why}, but the tokenizer of backbone.name={cfg.backbone.name!r} has no chat template; "
            "use a chat model (builtin:tiny-chat is the built-in one) or plain-string data"
        )
    if conversational and cfg.data.chat_template == "never":
        raise DataError(
            f"{', '.join(conversational)} hold conversational rows, which need the chat template, "
            "but data.chat_template=never"
        )
    for stage in cfg.run.stages:  # the stages that hold out whole prompts of the preference pairs (reward, DPO)
        if "preferences" in spec(stage).datasets and hasattr(getattr(cfg, stage), "eval_fraction"):
            check_split(
                stored_dataset(cfg.data.preferences, "preferences", cfg.task),
                getattr(cfg, stage).eval_fraction,
                f"{stage}.eval_fraction",
            )
    for stage in cfg.run.stages:
        checker_digest(stage, cfg)  # a user's checker that cannot be found fails here, before the run
    if conversational and plain and cfg.data.chat_template == "auto":
        raise DataError(
            f"{', '.join(conversational)} hold conversational prompts and {', '.join(plain)} plain-string "
            "ones: under data.chat_template=auto only the conversational ones go through the chat "
            "template, so the stages would see the same task in two formats; set data.chat_template: "
            "always, or make the datasets agree"
        )


@cache
def code_version(stage: str, package_dir: Path | None = None) -> str:
    """Digest of the code that computes ``stage``'s result: its recipe module and every module of the
    recipe's package it imports, transitively (``code_files``); its registry entry; and the pinned
    numeric libraries. Editing RRHF's recipe leaves SFT cached, editing a loss invalidates the stages
    that import it. The registry file itself is left out (adding a stage changes no other stage's key):
    the entry's fields stand in for it; so are the memory plan and progress output (``NOT_RESULTS``). ``package_dir`` replaces where ``stages`` is read from (tests)."""
    entry = spec(stage)
    digest = hashlib.sha256(json.dumps(entry.identity(), sort_keys=True).encode())
    roots = {"stages": package_dir or _source_root("stages")}
    top = entry.module.split(".")[0]
    roots.setdefault(top, _source_root(top))  # a plugin's recipe lives in a package (or file) of its own
    for name, path in code_files(entry.module, roots).items():
        digest.update(name.encode() + path.read_bytes())
    for name in _VERSIONED:
        digest.update(f"{name}=={metadata.version(name)}".encode())
    return digest.hexdigest()[:16]


def code_files(module: str, roots: dict[str, Path]) -> dict[str, Path]:
    """``{module name: file}`` of ``module`` and of every module it imports from the packages in
    ``roots`` (top-level name -> its source: a package folder, or a one-file module), directly or through
    others. Read statically (``ast``: imports inside functions count, those under ``if TYPE_CHECKING:``
    do not, as they never run; nothing runs, so the flow never imports torch for this). Relative imports are resolved, ancestor packages' ``__init__`` files count, and
    ``NOT_RESULTS`` are left out.

    Raises ``ModuleNotFoundError`` when ``module`` itself has no file.
    """
    files: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in files or _left_out(name):
            continue
        path = _module_file(roots, name)
        if path is None:
            if name == module:
                raise ModuleNotFoundError(f"{module}: no such module in {sorted(map(str, roots.values()))}")
            continue  # a name imported from a module (``from stages.io.config import ConfigError``)
        files[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo += [package.rsplit(".", depth)[0] for depth in range(package.count(".") + 1)]  # its __init__ files run
        for node in runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.split(".")[0] in roots]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                if base.split(".")[0] in roots:
                    todo += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return dict(sorted(files.items()))


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of a parsed module that can run: at its top, in functions and classes, but
    not under ``if TYPE_CHECKING:`` (annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for branch in node.orelse:
                yield from runtime_imports(ast.Module(body=[branch], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        else:
            yield from runtime_imports(node)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


# Modules that cannot change what a stage computes, left out of every code version: the registry (its
# entry stands in), the memory plan (estimates only), progress output, W&B tracking (it records what was
# computed) and the promotion gate (it judges finished results; the config imports it to check its names).
NOT_RESULTS = ("stages.registry", "stages.memory", "stages.io.progress", "stages.training.tracking", "stages.io.gate")


def _left_out(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in NOT_RESULTS)


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from <module> import ...``, relative ones resolved against ``package``."""
    if node.level == 0:
        return node.module or ""
    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{parent}.{node.module}" if node.module else parent


def _source_root(top: str) -> Path:
    """Where top-level package (its folder) or module (its file) ``top`` lives, found without importing it."""
    found = find_spec(top)
    if found is None or found.origin is None and not found.submodule_search_locations:
        raise ModuleNotFoundError(f"{top}: not importable")
    if found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    assert found.origin is not None  # checked above
    return Path(found.origin)


def _module_file(roots: dict[str, Path], name: str) -> Path | None:
    """The file of module ``name`` under ``roots``: ``a/b.py`` or ``a/b/__init__.py``; None if it is not one."""
    top, *parts = name.split(".")
    root = roots.get(top)
    if root is None:
        return None
    if root.is_file():  # a one-file module: nothing below it
        return None if parts else root
    base = root.joinpath(*parts)
    candidates = ([base.with_suffix(".py")] if parts else []) + [base / "__init__.py"]
    return next((c for c in candidates if c.is_file()), None)


def stage_provenance(stage: str, cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, Any]:
    """Config digest, backbone fingerprint, input and dataset digests, code version, and the cache key."""
    needed = stage_inputs(stage, cfg)
    missing = [name for name in needed if name not in inputs]
    if missing:
        raise artifacts.ArtifactError(f"stage {stage} needs the artifacts of {missing} (--input NAME=FOLDER)")
    backbone = backbone_fingerprint(cfg.backbone, needs_4bit(cfg.adapter.kind))  # first: an unbuilt one writes nothing
    datasets = {kind: dataset_digest(getattr(cfg.data, kind), kind, cfg.task) for kind in stage_datasets(stage, cfg)}
    provenance: dict[str, Any] = {
        "stage": stage,
        "config_digest": _sha(
            cfg.digest(*spec(stage).sections) + f"seed={cfg.run.seed};chat_template={cfg.data.chat_template}"
        ),
        "launch": launch_identity(stage, cfg),
        "backbone_fingerprint": backbone,
        "input_digests": {name: artifacts.artifact_digest(inputs[name]) for name in needed},
        "dataset_digest": _sha(json.dumps(datasets, sort_keys=True)),
        "code_version": code_version(stage),
    }
    if checker := checker_digest(stage, cfg):
        provenance["checker_digest"] = checker
    provenance["cache_key"] = _sha(json.dumps(provenance, sort_keys=True))
    return provenance


def checker_digest(stage: str, cfg: PipelineConfig) -> str | None:
    """Digest of the source file of a user's checker (``<stage>.checker: module:function``) that the stage's
    reward uses, so editing the function invalidates the cached result; None for none or the built-in one
    (versioned with the stage's code). Raises ``ConfigError`` naming it when it cannot be found."""
    section = getattr(cfg, stage)
    if not spec(stage).reward_source or "checker" not in section.reward or section.checker == "builtin":
        return None
    module = section.checker.partition(":")[0]
    # The stage runs as `python -m`, which puts the working directory first on sys.path; the rlhf console
    # script does not, so look there too (a my_rewards.py beside the config is found by both).
    sys.path.insert(0, os.getcwd())
    try:
        found = find_spec(module)
    except Exception as err:  # a dotted name imports its packages: their errors are the user's, in one line
        found, why = None, f"{type(err).__name__}: {err}"
    else:
        why = "no such module"
    finally:
        sys.path.remove(os.getcwd())
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ConfigError(
            f"{stage}.checker={section.checker!r}: cannot find module {module!r} ({why}); it must be "
            "importable where the stage runs (on PYTHONPATH or installed)"
        )
    return _sha(Path(found.origin).read_text(errors="replace"))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
