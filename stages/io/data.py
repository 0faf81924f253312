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
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from stages.io import arithmetic
from stages.io.config import DataRef, DataSection, DataSource, TaskSection
from stages.io.formats import RESPONSE_FIELDS, FormatError, Prompt, prompt_key, to_record


class Tokenization(Protocol):
    """What this module asks of ``stages.model.tokenization.Tokenization``: the ids of a prompt and of a
    response to it (a protocol, so the torch-free data layer never imports the model layer)."""

    def prompt_ids(self, prompt: Prompt) -> list[int]: ...

    def response_ids(self, prompt: Prompt, response: str) -> list[int]: ...


DataKind = Literal["sft", "preferences", "eval", "prompts", "ranked"]
Record = dict[str, Any]


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the line or row."""


def load_records(ref: DataRef, kind: DataKind, task_cfg: TaskSection) -> list[Record]:
    """Load and validate every record of ``ref`` for ``kind`` (fresh dicts, the caller's to change).

    Once per process while the file is unchanged: the CLI's checks, the memory plan, each cache key and
    the stage's own training all read the same datasets.
    """
    source = source_name(ref)
    columns = tuple(sorted(ref.columns.items())) if isinstance(ref, DataSource) else ()
    return copy.deepcopy(list(_cached_records(source, columns, kind, task_cfg, _file_stamp(source))))


def record_location(ref: DataRef, index: int) -> str:
    """Where record ``index`` (from 0, as ``load_records`` lists them) is in its file: ``line N`` of a
    JSONL file (blank lines hold no record), ``row N`` of Parquet or an HF dataset, else ``record N``."""
    source = source_name(ref)
    if source.endswith(".jsonl"):
        lines = (number for number, _ in _jsonl_rows(Path(source)))
        return f"line {next(n for i, n in enumerate(lines) if i == index)}"
    return f"row {index + 1}" if source.endswith(".parquet") or source.startswith("hf:") else f"record {index + 1}"


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


def _file_stamp(source: str) -> tuple[int, int] | None:
    """(modification time, size) of a dataset file, so an edited file is read again; None otherwise."""
    try:
        stat = Path(source).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=16)
def _cached_records(
    source: str,
    columns: tuple[tuple[str, str], ...],
    kind: DataKind,
    task_cfg: TaskSection,
    stamp: tuple[int, int] | None,
) -> tuple[Record, ...]:
    return tuple(_read_records(source, dict(columns), kind, task_cfg))


def _read_records(source: str, columns: dict[str, str], kind: DataKind, task_cfg: TaskSection) -> list[Record]:
    if source == "builtin":
        builders: dict[str, Callable[[TaskSection], list[Record]]] = {
            "sft": arithmetic.sft_records,
            "preferences": arithmetic.preference_records,
            "eval": arithmetic.eval_records,
            "prompts": arithmetic.prompt_records,
            "ranked": arithmetic.ranked_records,
        }
        return builders[kind](task_cfg)
    if source.startswith("hf:"):
        return _validated(_hf_rows(source), kind, source, "row", columns)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data.{kind}: {source}: no such file (expected builtin, a .jsonl/.parquet file or hf:NAME)")
    if path.suffix == ".jsonl":
        return _validated(_jsonl_rows(path), kind, source, "line", columns)
    if path.suffix == ".parquet":
        return _validated(_parquet_rows(path), kind, source, "row", columns)
    raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")


def split_by_prompt(
    pairs: list[Record], eval_fraction: float, source: str, setting: str = "reward.eval_fraction"
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) preference pairs: whole prompts are held out (by a hash of the prompt, so the split
    is stable as the file grows), so held-out accuracy measures generalisation to unseen prompts. Raises
    ``DataError`` naming the file and its number of distinct prompts when either part would be empty."""

    def held_out(prompt: Prompt) -> bool:
        return int(hashlib.sha256(prompt_key(prompt).encode()).hexdigest()[:8], 16) % 1000 < eval_fraction * 1000

    train = [p for p in pairs if not held_out(p["prompt"])]
    held = [p for p in pairs if held_out(p["prompt"])]
    if not train or not held:
        prompts = len({prompt_key(p["prompt"]) for p in pairs})
        raise DataError(
            f"{source}: {len(pairs)} preference pairs over {prompts} distinct prompt(s) leave {len(train)} "
            f"train / {len(held)} held-out pairs at {setting}={eval_fraction} (whole prompts "
            f"are held out); add pairs with other prompts or change {setting}"
        )
    return train, held


def dataset_digest(ref: DataRef, kind: DataKind, task_cfg: TaskSection) -> str:
    """Content digest of a dataset (what the cache key uses): its validated records, in order."""
    records = load_records(ref, kind, task_cfg)
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


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
    """``data.<kind>``'s records (``load_records``) and their lengths under ``max_tokens``
    (``measure_lengths``): how every stage opens a dataset. Raises ``DataError`` as those do."""
    ref = getattr(data, kind)
    records = load_records(ref, kind, task_cfg)
    return records, measure_lengths(records, kind, source_name(ref), tokenization, max_tokens)


def measure_lengths(
    records: list[Record], kind: DataKind, source: str, tokenization: Tokenization, max_tokens: int
) -> LengthReport:
    """Count the records longer than ``max_tokens``, tokenized by the stage's contract (prompt ids, then
    the longest response's ids with its end token), which every stage trains and scores on.

    SFT truncates to ``sft.max_length`` keeping the start and drops a row whose prompt alone fills it.
    A dataset in which no record has room for a response is a ``DataError``; so is conversational data
    (or ``data.chat_template: always``) with a tokenizer that has no chat template.
    """
    too_long, no_room = [], []
    for number, record in enumerate(records, start=1):
        try:
            prompt_len, total_len = _token_lengths(record, kind, tokenization)
        except ValueError as err:  # TokenizationError: the template cannot render this record
            raise DataError(f"{source}: record {number}: {err}") from None
        if total_len > max_tokens:
            too_long.append(number)
        if prompt_len >= max_tokens:
            no_room.append(number)
    report = LengthReport(source, kind, max_tokens, len(records), tuple(too_long), tuple(no_room))
    if records and len(no_room) == len(records):
        raise DataError(
            f"{source}: every {kind} record's prompt is at least {max_tokens} tokens long, "
            "so no response token fits; shorten the prompts or raise the maximum length"
        )
    return report


def _token_lengths(record: Record, kind: DataKind, tokenization: Tokenization) -> tuple[int, int]:
    """(prompt tokens, prompt + longest response + end token) of one record."""
    if kind == "ranked":
        prompt, responses = record["query"], list(record["responses"])
    else:
        prompt, responses = record["prompt"], [record[field] for field in RESPONSE_FIELDS[kind]]
    prompt_len = len(tokenization.prompt_ids(prompt))
    longest = max((len(tokenization.response_ids(prompt, r)) for r in responses), default=0)
    return prompt_len, prompt_len + longest


def _jsonl_rows(path: Path):
    # Bytes, decoded line by line: a file that is not UTF-8 (Latin-1, UTF-16 from an editor) then fails on
    # the line that holds the bad byte, instead of a UnicodeDecodeError from deep inside the file reader.
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = f"byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line"
                raise DataError(f"{path}: line {number}: not valid UTF-8 ({bad}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: not valid JSON ({err.msg})") from None


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet file ({err})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _hf_rows(source: str):
    import datasets

    name, _, split = source.removeprefix("hf:").partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # offline, unknown name, unknown split: all one actionable message
        raise DataError(f"{source}: cannot load HF dataset {name!r} split {split or 'train'!r} ({err})") from None
    yield from enumerate(dataset, start=1)


def _validated(rows, kind: DataKind, source: str, unit: str, columns: dict[str, str]) -> list[Record]:
    records = []
    for number, row in rows:
        try:
            records.append(to_record(_renamed(row, columns), kind))
        except FormatError as err:
            raise DataError(f"{source}: {unit} {number}: {err}") from None
    if not records:
        raise DataError(f"{source}: no {kind} records")
    return records


def _renamed(row: Any, columns: dict[str, str]) -> Any:
    """The row with each mapped column under the format's key (``DataSource.columns``)."""
    if not columns or not isinstance(row, dict):
        return row
    missing = [column for column in columns.values() if column not in row]
    if missing:
        raise FormatError(f"no column(s) {missing} (data.*.columns maps them); the row has keys {sorted(row)}")
    renamed = {key: value for key, value in row.items() if key not in columns.values()}
    renamed.update({key: row[column] for key, column in columns.items()})
    return renamed
