"""The pre-flight check of the tokenization contract on the configured data, before any run folder exists.

With the backbone's real tokenizer (no weights loaded) and the contract every stage uses
(``stages.model.tokenization``):

* **Rendering.** Every distinct prompt shape of every dataset the run's stages read (a conversation's
  sequence of roles, or plain text under ``data.chat_template: always``) goes through the chat template
  once. A template that refuses one (Mistral v0.1's has no system role) is a ``DataError`` naming the
  file, the line and the template's own complaint, instead of a failure minutes into the run.
* **Budgets.** Per stage, how many rows its token budgets cut or drop, counted with the exact ids the
  stage trains on (templates add tens of ids: Llama 3.1's date header makes the chat prompt ``3+4=`` 44-45 ids): SFT's
  ``sft.max_length``, the context for the reward model and DPO (with DPO's pairs that truncation makes
  identical, ``stages.dpo.pairs.distinct_after_truncation``), and the rollout prompts that would generate past
  the context with the stage's ``max_new_tokens``. A dataset of more than ``SAMPLE_ROWS`` rows is counted
  on an even sample of them and the counts are scaled (said as "about").

* **LoRA targets.** ``adapter.target_modules`` that name no module of the backbone
  (``stages.model.adapters.check_target_modules``, on the meta device).

It runs in a process of its own (``python -m stages.tools.contract_check``), because the tokenizer needs
transformers and the CLI's process never imports torch: ``rlhf run``/``stage``/``resume``/``sweep`` start it
in pre-flight (``flows.preflight``), ``rlhf plan`` prints its lines. Exit status 2 with ``error: ...`` on a refusal. A backbone
whose files are not here (a hub id not downloaded, offline) is not refused: the check notes it and the
stages check the data when they load the tokenizer, as before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from stages.dpo.pairs import distinct_after_truncation, tokenized_pairs
from stages.io.artifacts import ArtifactError
from stages.io.config import ConfigError, PipelineConfig, load_config
from stages.io.data import (
    DataError,
    DataKind,
    load_rollout_prompts,
    measure_lengths,
    measured,
    source_name,
    stored_dataset,
)
from stages.io.dataset_store import StoredDataset
from stages.io.provenance import stage_datasets
from stages.model.adapters import check_target_modules
from stages.model.backbone import resolve_backbone
from stages.model.tokenization import Tokenization, TokenizationError, generation_end_ids
from stages.registry import spec

SAMPLE_ROWS = 5000  # rows tokenized per dataset for the budget counts (all of them up to this many)
MOST = 0.5  # a budget that cuts more than this share of a dataset's rows is warned about loudly


@dataclass(frozen=True)
class BudgetCount:
    """What one stage's token budget does to one dataset's rows."""

    stage: str
    dataset: str  # the file (or builtin) and its kind
    budget: str  # the limit and where it comes from, e.g. "sft.max_length=64"
    rows: int
    cut: int  # rows over the budget (an SFT demo loses its end token; a rollout runs past the context)
    dropped: int  # rows the stage leaves out (no room for a response; DPO pairs made identical)
    estimated: bool  # counted on an even sample of SAMPLE_ROWS rows, then scaled
    effect: str  # what being over the budget does to a row
    remedy: str  # the setting to change

    def line(self) -> str:
        about = "about " if self.estimated else ""
        text = (
            f"{self.stage}: {self.dataset}: {about}{self.cut} of {self.rows} rows over {self.budget}"
            f"{f' ({self.effect})' if self.cut else ''}, {about}{self.dropped} dropped"
        )
        return f"WARNING: {text}: most rows are over it; {self.remedy}" if self.mostly_cut else text

    @property
    def mostly_cut(self) -> bool:
        return self.rows > 0 and self.cut > MOST * self.rows


def contract_tokenization(cfg: PipelineConfig) -> tuple[Tokenization, int]:
    """The stages' ``Tokenization`` of the configured backbone, and its context length, from its files
    (tokenizer, ``generation_config.json`` or, as transformers does without one, ``config.json``)
    without loading the weights. Raises ``OSError`` when they are not here."""
    location = resolve_backbone(cfg.backbone)
    options = {"revision": cfg.backbone.revision, "trust_remote_code": cfg.backbone.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(location, **options)
    config = AutoConfig.from_pretrained(location, **options)
    try:
        generation = GenerationConfig.from_pretrained(location, revision=cfg.backbone.revision)
    except OSError:  # no generation_config.json: transformers builds the model's from config.json
        generation = GenerationConfig.from_model_config(config)
    context = config.max_position_embeddings
    return Tokenization.of(tokenizer, cfg.data.chat_template, generation_end_ids(generation)), context


def check_rendering(cfg: PipelineConfig, tokenization: Tokenization) -> None:
    """Render one prompt of every distinct shape of every dataset the run reads; raises ``DataError``
    naming the file, the line, the shape and the template's complaint for one it refuses."""
    kinds = sorted({kind for stage in cfg.run.stages for kind in stage_datasets(stage, cfg)})
    for kind in kinds:
        ref = getattr(cfg.data, kind)
        dataset = stored_dataset(ref, kind, cfg.task)
        for index, shape in _first_of_each_shape(dataset).items():
            (record,) = dataset.records([index])
            prompt = record.get("prompt", record.get("query"))
            try:
                tokenization.prompt_ids(prompt)
            except TokenizationError as err:
                roles = f"roles {list(shape)}" if shape != ("text",) else "a plain-text prompt"
                raise DataError(
                    f"{source_name(ref)}: {dataset.location(index)}: a prompt with {roles}: {err} "
                    f"(backbone.name={cfg.backbone.name})"
                ) from None


def _first_of_each_shape(dataset: StoredDataset) -> dict[int, tuple[str, ...]]:
    """{index of the first record of each prompt shape: the shape}: the roles of a conversational prompt's
    messages, or ``("text",)``, in file order; read from the store's prompt keys, not the records."""
    table = dataset.table()
    first: dict[tuple[str, ...], int] = {}
    messages = table.column("messages").to_numpy()
    plain = np.flatnonzero(messages == 0)
    if len(plain):
        first[("text",)] = int(plain[0])
    conversational = np.flatnonzero(messages > 0)
    keys = table.column("prompt_key").take(pa.array(conversational)).to_pylist() if len(conversational) else []
    for index, key in zip(conversational.tolist(), keys):
        first.setdefault(tuple(m["role"] for m in json.loads(key)), index)
    return {index: shape for shape, index in sorted(first.items(), key=lambda item: item[1])}


def tokenize_datasets(cfg: PipelineConfig, tokenization: Tokenization) -> None:
    """Tokenize every dataset the configured stages read into the dataset store (once per content and
    tokenization; ``stages.io.dataset_store``), so that each stage process reads its ids: the run's
    pre-flight (``--tokenize``), with progress lines on stderr. Raises ``DataError`` for a record the
    tokenizer cannot render."""
    for kind in sorted({kind for stage in cfg.run.stages for kind in stage_datasets(stage, cfg)}):
        stored_dataset(getattr(cfg.data, kind), kind, cfg.task).tokens(tokenization)


def budget_counts(cfg: PipelineConfig, tokenization: Tokenization, context: int) -> list[BudgetCount]:
    """``BudgetCount`` of every configured stage's token budgets on its datasets (module docstring)."""
    counts = []
    for stage in cfg.run.stages:
        datasets = spec(stage).datasets
        if rolls_out(stage, cfg):
            counts.append(_rollout_count(stage, cfg, tokenization, context))
        elif "sft" in datasets and "prompts" not in spec(stage).optional_datasets:
            counts.append(
                _count(
                    stage,
                    cfg,
                    "sft",
                    tokenization,
                    f"sft.max_length={cfg.sft.max_length}",
                    cfg.sft.max_length,
                    "cut: the demo loses its end",
                    "raise sft.max_length",
                )
            )
        elif "preferences" in datasets:
            counts.append(
                _count(
                    stage,
                    cfg,
                    "preferences",
                    tokenization,
                    f"the backbone's context={context}",
                    context,
                    "cut at the context",
                    "shorten the pairs",
                    dpo_pairs=stage == "dpo",
                )
            )
    return counts


def rolls_out(stage: str, cfg: PipelineConfig) -> bool:
    """Whether ``stage`` samples responses to rollout prompts in this run: a stage that samples while it
    trains, unless a dataset replaces what it would sample (RRHF on ``data.ranked``)."""
    entry = spec(stage)
    replaced = any(kind in entry.needed_datasets(cfg) for kind in entry.unless_data.values())
    return entry.samples_while_training and not replaced


def _even_sample(rows: list[Any]) -> list[Any]:
    return rows if len(rows) <= SAMPLE_ROWS else [rows[i * len(rows) // SAMPLE_ROWS] for i in range(SAMPLE_ROWS)]


def _even_indices(count: int) -> list[int]:
    return _even_sample(list(range(count)))


def _count(
    stage: str,
    cfg: PipelineConfig,
    kind: DataKind,
    tokenization: Tokenization,
    budget: str,
    limit: int,
    effect: str,
    remedy: str,
    dpo_pairs: bool = False,
) -> BudgetCount:
    ref = getattr(cfg.data, kind)
    dataset = stored_dataset(ref, kind, cfg.task)
    if dataset.has_tokens(tokenization) and not dpo_pairs:  # every row, exactly: the run's pre-flight tokenized it
        lengths, sampled = measured(dataset, tokenization, limit), dataset.rows
    else:
        sample = dataset.records(_even_indices(dataset.rows))
        lengths, sampled = measure_lengths(sample, kind, source_name(ref), tokenization, limit), len(sample)
    dropped = len(lengths.no_room)
    if dpo_pairs:
        dropped = len(distinct_after_truncation(tokenized_pairs(sample, tokenization), limit)[1])
    scale = dataset.rows / sampled
    return BudgetCount(
        stage,
        f"{source_name(ref)} ({kind})",
        budget,
        dataset.rows,
        round(len(lengths.too_long) * scale),
        round(dropped * scale),
        sampled < dataset.rows,
        effect,
        remedy,
    )


def _rollout_count(stage: str, cfg: PipelineConfig, tokenization: Tokenization, context: int) -> BudgetCount:
    """Rollout prompts whose ids plus ``<stage>.max_new_tokens`` exceed the context: the stages sample them
    anyway (a prompt alone over the context is the ``DataError`` the stage raises too)."""
    new, ref = getattr(cfg, stage).max_new_tokens, cfg.data.prompts or cfg.data.sft
    prompts = load_rollout_prompts(cfg.data, cfg.task)
    sample = _even_sample(prompts)
    measure_lengths([{"prompt": p} for p in sample], "prompts", source_name(ref), tokenization, context)
    over = sum(len(tokenization.prompt_ids(p)) + new > context for p in sample)
    return BudgetCount(
        stage,
        f"{source_name(ref)} (rollout prompts)",
        f"the context={context} with {stage}.max_new_tokens={new}",
        len(prompts),
        round(over * len(prompts) / len(sample)),
        0,
        len(sample) < len(prompts),
        "would generate past the context",
        f"lower {stage}.max_new_tokens or shorten the prompts",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.tools.contract_check", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--json", action="store_true", help="print the budget counts as JSON")
    parser.add_argument("--tokenize", action="store_true", help="tokenize every dataset into the dataset store")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [])
    with one_line_errors(cfg):
        location = resolve_backbone(cfg.backbone)
        check_target_modules(cfg.adapter, location, cfg.backbone.revision, cfg.backbone.trust_remote_code)
        try:
            tokenization, context = contract_tokenization(cfg)
        except OSError as err:  # not here (a hub id not downloaded, offline): the stages check when they load it
            print(
                f"note: backbone.name={cfg.backbone.name!r}: its tokenizer is not readable here ({first_line(err)}); "
                "the data's tokenization is checked when each stage loads it",
                file=sys.stderr,
            )
            counts = []
        else:
            check_rendering(cfg, tokenization)
            if args.tokenize:
                tokenize_datasets(cfg, tokenization)
            counts = budget_counts(cfg, tokenization, context)
    if args.json:
        print(json.dumps([asdict(c) | {"line": c.line(), "mostly_cut": c.mostly_cut} for c in counts]))
    else:
        print("\n".join(count.line() for count in counts))


def first_line(err: BaseException) -> str:
    """An exception's first line, or its type: library errors often span several lines."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def one_line_errors(cfg: PipelineConfig) -> Iterator[None]:
    """Inside it, any exception ends the process with ``error: <one line>`` and status 2: a user error
    as itself, anything else (a tokenizer that needs ``trust_remote_code``, a missing package) by its
    type and first line, never as a traceback (``RLHF_TRACEBACK=1`` shows it)."""
    try:
        yield
    except Exception as err:
        if os.environ.get("RLHF_TRACEBACK"):
            raise
        known = isinstance(err, (ConfigError, DataError, TokenizationError, ArtifactError))
        message = str(err) if known else f"backbone.name={cfg.backbone.name!r}: {type(err).__name__}: {first_line(err)}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
