"""Datasets as lists of validated records, from the built-in task, JSONL, Parquet or HF ``datasets``.

Four kinds, each a flat record of non-empty strings (ranked: lists):

    sft          {"prompt": ..., "completion": ...}
    preferences  {"prompt": ..., "chosen": ..., "rejected": ...}
    eval         {"prompt": ..., "answer": ...}      (task_score: the response must equal the answer)
    ranked       {"query": ..., "responses": [...], "scores": [...]}   (RRHF's offline format)

A source is ``builtin``, a path ending in ``.jsonl`` / ``.parquet``, or ``hf:NAME[:SPLIT]``.
A malformed row raises ``DataError`` naming the file and the line (JSONL) or row (Parquet, HF); so do
bytes that are not UTF-8 and a dataset without records. ``measure_lengths`` counts records over a
token budget, which needs the stage's tokenizer (docs/errors.md says what each stage does with them).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from stages.io import arithmetic
from stages.io.config import TaskSection

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DataKind = Literal["sft", "preferences", "eval", "ranked"]
FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preferences": ("prompt", "chosen", "rejected"),
    "eval": ("prompt", "answer"),
    "ranked": ("query", "responses", "scores"),
}
Record = dict[str, Any]


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the line or row."""


def load_records(source: str, kind: DataKind, task_cfg: TaskSection) -> list[Record]:
    """Load and validate every record of ``source`` for ``kind`` (fresh dicts, the caller's to change).

    Once per process while the file is unchanged: the CLI's checks, the memory plan, each cache key and
    the stage's own training all read the same datasets.
    """
    return copy.deepcopy(list(_cached_records(source, kind, task_cfg, _file_stamp(source))))


def _file_stamp(source: str) -> tuple[int, int] | None:
    """(modification time, size) of a dataset file, so an edited file is read again; None otherwise."""
    try:
        stat = Path(source).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=16)
def _cached_records(source: str, kind: DataKind, task_cfg: TaskSection, stamp: tuple[int, int] | None
                    ) -> tuple[Record, ...]:
    return tuple(_read_records(source, kind, task_cfg))


def _read_records(source: str, kind: DataKind, task_cfg: TaskSection) -> list[Record]:
    if source == "builtin":
        builders = {"sft": arithmetic.sft_records, "preferences": arithmetic.preference_records,
                    "eval": arithmetic.eval_records, "ranked": arithmetic.ranked_records}
        return builders[kind](task_cfg)
    if source.startswith("hf:"):
        return _validated(_hf_rows(source), kind, source, "row")
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data.{kind}: {source}: no such file (expected builtin, a .jsonl/.parquet file or hf:NAME)")
    if path.suffix == ".jsonl":
        return _validated(_jsonl_rows(path), kind, source, "line")
    if path.suffix == ".parquet":
        return _validated(_parquet_rows(path), kind, source, "row")
    raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")


def dataset_digest(source: str, kind: DataKind, task_cfg: TaskSection) -> str:
    """Content digest of a dataset (what the cache key uses): its validated records, in order."""
    records = load_records(source, kind, task_cfg)
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
        return (f"{self.source}: {len(self.too_long)} of {self.total} {self.kind} records are longer than "
                f"{self.max_tokens} tokens (records {shown}); "
                f"{len(self.no_room)} of them have no room for the response")


def measure_lengths(records: list[Record], kind: DataKind, source: str, tokenizer: "PreTrainedTokenizerBase",
                    max_tokens: int) -> LengthReport:
    """Count the records longer than ``max_tokens``, tokenized the way the stage that reads them does.

    SFT rows are measured as TRL's SFTTrainer tokenizes them (``prompt + completion + eos`` in one call,
    special tokens included), which truncates to ``sft.max_length`` keeping the start and drops a row whose
    prompt alone fills it. The other kinds are measured as ``stages.model.sequences.encode`` builds them (prompt,
    then response, then EOS). A dataset in which no record has room for a response is a ``DataError``.
    """
    too_long, no_room = [], []
    for number, record in enumerate(records, start=1):
        prompt_len, total_len = _token_lengths(record, kind, tokenizer)
        if total_len > max_tokens:
            too_long.append(number)
        if prompt_len >= max_tokens:
            no_room.append(number)
    report = LengthReport(source, kind, max_tokens, len(records), tuple(too_long), tuple(no_room))
    if records and len(no_room) == len(records):
        raise DataError(f"{source}: every {kind} record's prompt is at least {max_tokens} tokens long, "
                        "so no response token fits; shorten the prompts or raise the maximum length")
    return report


def _token_lengths(record: Record, kind: DataKind, tokenizer: "PreTrainedTokenizerBase") -> tuple[int, int]:
    """(prompt tokens, prompt + longest response + EOS tokens) of one record."""
    if kind == "sft":
        text = record["prompt"] + record["completion"] + tokenizer.eos_token
        return len(tokenizer(record["prompt"]).input_ids), len(tokenizer(text).input_ids)
    if kind == "ranked":
        prompt, responses = record["query"], list(record["responses"])
    else:
        prompt, responses = record["prompt"], [record[field] for field in FIELDS[kind][1:]]
    prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    longest = max(len(ids) for ids in tokenizer(responses, add_special_tokens=False).input_ids)
    return prompt_len, prompt_len + longest + 1


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


def _validated(rows, kind: DataKind, source: str, unit: str) -> list[Record]:
    fields = FIELDS[kind]
    records = []
    for number, row in rows:
        where = f"{source}: {unit} {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with keys {list(fields)}, got {type(row).__name__}")
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; {kind} rows need {list(fields)}")
        record = {field: row[field] for field in fields}
        problem = _ranked_problem(record) if kind == "ranked" else _text_problem(record, kind)
        if problem:
            raise DataError(f"{where}: {problem}")
        records.append(record)
    if not records:
        raise DataError(f"{source}: no {kind} records")
    return records


def _non_empty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text_problem(record: Record, kind: DataKind) -> str | None:
    for field, value in record.items():
        if not _non_empty(value):
            return f"{field!r} must be a non-empty string, got {value!r}"
    if kind == "preferences" and record["chosen"].strip() == record["rejected"].strip():
        return "'chosen' and 'rejected' are the same text, so the pair teaches nothing"
    return None


def _ranked_problem(record: Record) -> str | None:
    responses, scores = record["responses"], record["scores"]
    if not _non_empty(record["query"]):
        return f"'query' must be a non-empty string, got {record['query']!r}"
    if not isinstance(responses, list) or not responses or not all(_non_empty(r) for r in responses):
        return "'responses' must be a non-empty list of non-empty strings"
    if not isinstance(scores, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        return "'scores' must be a list of numbers"
    if len(scores) != len(responses):
        return f"'scores' has {len(scores)} entries but 'responses' has {len(responses)}"
    return None
