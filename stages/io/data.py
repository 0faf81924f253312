"""Datasets as lists of validated records, from the built-in task, JSONL, Parquet or HF ``datasets``.

Five kinds; each accepts the formats of ``stages.io.formats`` (TRL's names: prompt-completion,
language modeling, explicit and implicit prompt preferences, prompt-only, ...) and yields one record
shape per kind, with standard (string) or conversational (message list) prompts:

    sft          {"prompt": ..., "completion": ...}
    preferences  {"prompt": ..., "chosen": ..., "rejected": ...}
    eval         {"prompt": ..., "answer": ...}      (task_score: the response must equal the answer)
    prompts      {"prompt": ...}                      (PPO/RRHF rollouts; default: the SFT prompts)
    ranked       {"query": ..., "responses": [...], "scores": [...]}   (RRHF's offline format)

A source is ``builtin``, a path ending in ``.jsonl`` / ``.parquet``, or ``hf:NAME[:SPLIT]``, optionally
with a column mapping (``DataSource``). A malformed row raises ``DataError`` naming the file and the line
(JSONL) or row (Parquet, HF) and the formats it could have been; so do bytes that are not UTF-8 and a
dataset without records. ``measure_lengths`` counts records over a token budget, tokenized by the
stage's ``stages.model.tokenization.Tokenization`` (docs/errors.md says what each stage does with them).

Every dataset is read, validated and tokenized once per content and tokenization, into the dataset
store (``stages.io.dataset_store``: memory-mapped Arrow under ``$RLHF_HOME/datasets``), which the CLI's
checks, every stage process and every later run read again.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.io.config import DataRef, DataSection, DataSource, TaskSection
from stages.io.dataset_store import TOKENS_SCHEMA, DataError, StoredDataset, Tokenization, stored, tokenized_batch
from stages.io.formats import RESPONSE_FIELDS, Prompt, prompt_key

DataKind = Literal["sft", "preferences", "eval", "prompts", "ranked"]
Record = dict[str, Any]


def stored_dataset(ref: DataRef, kind: DataKind, task_cfg: TaskSection) -> StoredDataset:
    """``ref`` read as ``kind`` into the dataset store (once per content; then found there). Raises
    ``DataError`` naming the file and the line or row of a bad record."""
    columns = dict(ref.columns) if isinstance(ref, DataSource) else {}
    return stored(source_name(ref), columns, kind, task_cfg)


def load_records(ref: DataRef, kind: DataKind, task_cfg: TaskSection) -> list[Record]:
    """Every validated record of ``ref`` for ``kind``, in file order (fresh dicts, the caller's to change)."""
    return stored_dataset(ref, kind, task_cfg).records()


def record_location(ref: DataRef, index: int, kind: DataKind, task_cfg: TaskSection) -> str:
    """Where record ``index`` (from 0, as ``load_records`` lists them) is in its file: ``line N`` of a
    JSONL file (blank lines hold no record), ``row N`` of Parquet or an HF dataset, else ``record N``."""
    return stored_dataset(ref, kind, task_cfg).location(index)


def source_name(ref: DataRef) -> str:
    """The file (or ``builtin``, or ``hf:`` name) a dataset reference reads, with or without a column
    mapping: what messages name."""
    return ref.source if isinstance(ref, DataSource) else ref


def load_rollout_prompts(
    data: Any, task_cfg: TaskSection, tokenization: Tokenization | None = None, max_tokens: int = 0
) -> list[Prompt]:
    """The distinct prompts PPO and RRHF roll out on, in a fixed order: ``data.prompts``, or by default
    the SFT demonstrations' prompts (``data`` is the config's ``data`` section). Given the stage's
    ``tokenization``, each is rendered once, so a prompt the tokenizer cannot render fails here
    (``measure_lengths``: "record N" counts the sorted distinct prompts)."""
    ref = data.prompts if data.prompts is not None else data.sft
    if data.prompts is not None:
        records = load_records(ref, "prompts", task_cfg)
    else:
        records = [r for r in load_records(ref, "sft", task_cfg) if r["prompt"]]
        if not records:
            raise DataError(
                f"data.sft: {source_name(ref)}: language-modeling rows have no prompts to roll out on; "
                "set data.prompts (prompt-only rows)"
            )
    unique = {prompt_key(r["prompt"]): r["prompt"] for r in records}
    prompts = [unique[key] for key in sorted(unique)]
    if tokenization is not None:
        measure_lengths(
            [{"prompt": p} for p in prompts],
            "prompts",
            f"{source_name(ref)} (distinct prompts, sorted)",
            tokenization,
            max_tokens,
        )
    return prompts


def split_by_prompt(
    pairs: list[Record], eval_fraction: float, source: str, setting: str = "reward.eval_fraction"
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) preference pairs: whole prompts are held out (by a hash of the prompt, so the split
    is stable as the file grows), so held-out accuracy measures generalisation to unseen prompts. Raises
    ``DataError`` naming the file and its number of distinct prompts when either part would be empty."""
    train, held = split_indices([prompt_key(p["prompt"]) for p in pairs], eval_fraction, source, setting)
    return [pairs[i] for i in train], [pairs[i] for i in held]


def split_indices(
    prompt_keys: list[str], eval_fraction: float, source: str, setting: str
) -> tuple[list[int], list[int]]:
    """``split_by_prompt`` of pairs given by their prompts' keys (``formats.prompt_key``): (train indices,
    held-out indices). Raises ``DataError`` as ``split_by_prompt`` does."""
    flags = held_out_flags(prompt_keys, eval_fraction)
    _check_split(prompt_keys, flags, eval_fraction, source, setting)
    return [i for i, held in enumerate(flags) if not held], [i for i, held in enumerate(flags) if held]


def check_split(dataset: StoredDataset, eval_fraction: float, setting: str) -> None:
    """``split_by_prompt``'s check on a stored dataset, from its prompt keys alone (no record is parsed)."""
    keys = dataset.table().column("prompt_key").to_pylist()
    _check_split(keys, held_out_flags(keys, eval_fraction), eval_fraction, dataset.source, setting)


def held_out_flags(prompt_keys: list[str], eval_fraction: float) -> list[bool]:
    """Whether each prompt (by ``formats.prompt_key``) is held out: its sha256 bucket below the fraction;
    hashed once per distinct prompt."""
    verdicts: dict[str, bool] = {}
    for key in prompt_keys:
        if key not in verdicts:
            verdicts[key] = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 1000 < eval_fraction * 1000
    return [verdicts[key] for key in prompt_keys]


def _check_split(keys: list[str], flags: list[bool], eval_fraction: float, source: str, setting: str) -> None:
    held = sum(flags)
    if held == 0 or held == len(flags):
        raise DataError(
            f"{source}: {len(flags)} preference pairs over {len(set(keys))} distinct prompt(s) leave "
            f"{len(flags) - held} train / {held} held-out pairs at {setting}={eval_fraction} (whole prompts "
            f"are held out); add pairs with other prompts or change {setting}"
        )


def evaluation_sample(held: list[Record], budget: int, seed: int) -> list[Record]:
    """At most ``budget`` held-out records (0: all), drawn without replacement by ``random.Random(seed)``
    and kept in file order, so an evaluation costs the same whatever the dataset's size and is the same
    rows in every run with the same seed and data."""
    if budget <= 0 or len(held) <= budget:
        return held
    return [held[i] for i in sorted(random.Random(seed).sample(range(len(held)), budget))]


def dataset_digest(ref: DataRef, kind: DataKind, task_cfg: TaskSection) -> str:
    """Content digest of a dataset (what the cache key uses): its validated records, in order (the store
    computes it as it writes them)."""
    return stored_dataset(ref, kind, task_cfg).digest


@dataclass(frozen=True)
class LengthReport:
    """Records of one dataset that exceed a token budget; record numbers count from 1 in file order."""

    source: str
    kind: DataKind
    max_tokens: int
    total: int
    too_long: tuple[int, ...]  # prompt + longest response (+ EOS) is over the budget
    no_room: tuple[int, ...]  # the prompt alone fills the budget: truncation leaves no response token

    def warning(self) -> str | None:
        """One line for the stage's log, or None when every record fits."""
        if not self.too_long:
            return None
        shown = ", ".join(str(n) for n in self.too_long[:5]) + (", ..." if len(self.too_long) > 5 else "")
        return (
            f"{self.source}: {len(self.too_long)} of {self.total} {self.kind} records are longer than "
            f"{self.max_tokens} tokens (records {shown}); "
            f"{len(self.no_room)} of them have no room for the response"
        )


def load_measured(
    data: DataSection, kind: DataKind, task_cfg: TaskSection, tokenization: Tokenization, max_tokens: int
) -> tuple[list[Record], LengthReport]:
    """``data.<kind>``'s records (``load_records``) and their lengths under ``max_tokens``, from the token
    ids the dataset store keeps for this tokenization (tokenized here only the first time): how every
    stage opens a dataset. Raises ``DataError`` as ``measure_lengths`` does."""
    dataset = stored_dataset(getattr(data, kind), kind, task_cfg)
    return dataset.records(), measured(dataset, tokenization, max_tokens)


def measured(dataset: StoredDataset, tokenization: Tokenization, max_tokens: int) -> LengthReport:
    """``measure_lengths`` of a stored dataset, from its token table (built the first time)."""
    prompt_lengths, total_lengths = token_lengths(dataset.tokens(tokenization))
    return _report(dataset.source, dataset.kind, max_tokens, prompt_lengths, total_lengths)  # type: ignore[arg-type]


def token_lengths(tokens: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, prompt + longest response tokens) of each row of a store's token table, (N,) each."""
    prompts, totals = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for batch in tokens.to_batches():  # a batch at a time: only the lengths of a large table are in memory
        prompt = list_lengths(batch.column("prompt_ids"))
        responses = batch.column("response_ids")
        per_response = list_lengths(pc.list_flatten(responses))
        counts = list_lengths(responses)
        longest = np.zeros(len(counts), dtype=np.int64)
        has = counts > 0
        if has.any():
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            longest[has] = np.maximum.reduceat(per_response, starts[has])
        prompts.append(prompt)
        totals.append(prompt + longest)
    return np.concatenate(prompts), np.concatenate(totals)


def list_lengths(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The length of each list in an Arrow list column, as int64 numpy (N,)."""
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def measure_lengths(
    records: list[Record], kind: DataKind, source: str, tokenization: Tokenization, max_tokens: int
) -> LengthReport:
    """Count the records longer than ``max_tokens``, tokenized by the stage's contract (prompt ids, then
    the longest response's ids with its end token), which every stage trains and scores on.

    SFT truncates to ``sft.max_length`` keeping the start and drops a row whose prompt alone fills it.
    A dataset in which no record has room for a response is a ``DataError``; so is conversational data
    (or ``data.chat_template: always``) with a tokenizer that has no chat template.
    """
    batch = tokenized_batch(records, RESPONSE_FIELDS.get(kind), tokenization, source=source)
    prompt_lengths, total_lengths = token_lengths(pa.table(batch, schema=TOKENS_SCHEMA))
    return _report(source, kind, max_tokens, prompt_lengths, total_lengths)


def _report(
    source: str, kind: DataKind, max_tokens: int, prompt_lengths: np.ndarray, total_lengths: np.ndarray
) -> LengthReport:
    too_long = tuple(int(i) + 1 for i in np.flatnonzero(total_lengths > max_tokens))
    no_room = tuple(int(i) + 1 for i in np.flatnonzero(prompt_lengths >= max_tokens))
    report = LengthReport(source, kind, max_tokens, len(prompt_lengths), too_long, no_room)
    if len(prompt_lengths) and len(no_room) == len(prompt_lengths):
        raise DataError(
            f"{source}: every {kind} record's prompt is at least {max_tokens} tokens long, "
            "so no response token fits; shorten the prompts or raise the maximum length"
        )
    return report
