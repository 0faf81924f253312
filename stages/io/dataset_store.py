"""Datasets read once: validated records and their token ids as memory-mapped Arrow files under
``$RLHF_HOME/datasets``, content-addressed, shared by the CLI's checks, every stage process and every run.

A dataset's folder is named by a digest of what its records depend on: the source's content (a file's
bytes, the built-in task's settings, an HF dataset's fingerprint), the kind, the column mapping and the
code that reads rows (``formats.py``, ``arithmetic.py``, this module). It holds

    records.arrow          one row per record: the record as canonical JSON (``json.dumps(sort_keys=True)``:
                           prompts are strings or message lists, so one JSON column keeps the record's
                           exact shape), where it is in the file, its prompt's key and UTF-8 sizes
                           (the memory plan's upper bounds on token counts)
    meta.json              source, kind, rows, the content digest of the records (the cache key's)
    tokens-<F>.arrow       per tokenization contract ``F`` (``Tokenization.fingerprint``): each record's
                           prompt ids and the ids of each of its responses, as every stage trains on them

Rows are validated as they stream from the file, a batch at a time, so the file is never held as Python
objects; a bad row raises the same ``DataError`` as ever (file, line, the formats it could have been)
and leaves nothing behind. Files are written under a temporary name and renamed into place, so a
failed or concurrent build never leaves a half-written table that a later reader takes for a finished one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from stages.io import arithmetic
from stages.io.config import TaskSection
from stages.io.formats import RESPONSE_FIELDS, FormatError, Prompt, prompt_key, prompt_text, to_record
from stages.io.paths import rlhf_home
from stages.io.progress import progress_mode

STORE_VERSION = "1"
BATCH_ROWS = 8192  # records validated, written and tokenized at a time: bounds the memory of a build
REPORT_EVERY_S = 10.0  # a progress line at most this often while a dataset is read or tokenized
FINISHED_LINE_AFTER_S = 2.0  # a phase that took this long ends with a line saying so
Record = dict[str, Any]
RECORDS_SCHEMA = pa.schema(
    [
        ("record", pa.string()),
        ("location", pa.int64()),  # JSONL: the line; Parquet, HF: the row; built-in: the record (from 1)
        ("prompt_key", pa.string()),  # formats.prompt_key of the prompt (ranked: the query)
        ("prompt_bytes", pa.int64()),  # UTF-8 bytes of the prompt's words (formats.prompt_text)
        ("response_bytes", pa.int64()),  # UTF-8 bytes of the longest response
        ("messages", pa.int64()),  # messages of a conversational prompt, 0 for a string
    ]
)
TOKENS_SCHEMA = pa.schema([("prompt_ids", pa.list_(pa.int32())), ("response_ids", pa.list_(pa.list_(pa.int32())))])


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the line or row."""


class Tokenization(Protocol):
    """What the store asks of ``stages.model.tokenization.Tokenization`` (a protocol, so this torch-free
    floor never imports the model layer)."""

    @property
    def fingerprint(self) -> str: ...

    def pairs(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[tuple[list[int], list[int]]]: ...


@dataclass(frozen=True)
class StoredDataset:
    """One dataset's validated records in the store (module docstring)."""

    folder: Path
    source: str
    kind: str
    digest: str  # sha256 of the records' canonical JSON, as a list, in order (16 hex chars)
    rows: int
    unit: str  # how messages count rows: "line" (JSONL), "row" (Parquet, HF), "record" (built-in)

    def table(self) -> pa.Table:
        """The records table, memory-mapped (nothing is read until a column is used)."""
        return _read_arrow(self.folder / "records.arrow")

    def records(self, indices: Sequence[int] | None = None) -> list[Record]:
        """Fresh record dicts (the caller's to change), all of them in file order or those at ``indices``."""
        column = self.table().column("record")
        if indices is not None:
            column = column.take(pa.array(indices, type=pa.int64()))
        return [json.loads(text) for text in column.to_pylist()]

    def prompt_styles(self) -> tuple[bool, bool]:
        """(some prompt is conversational, some is a non-empty string; "" is language-modelling text)."""
        table = self.table()
        conversational = pc.greater(table.column("messages"), 0)
        return pc.any(conversational).as_py() or False, pc.any(
            pc.and_(pc.invert(conversational), pc.not_equal(table.column("prompt_key"), ""))
        ).as_py() or False

    def location(self, index: int) -> str:
        """Where record ``index`` (from 0) is in its source: ``line N``, ``row N`` or ``record N``."""
        return f"{self.unit} {self.table().column('location')[index].as_py()}"

    def has_tokens(self, tokenization: Tokenization) -> bool:
        """Whether the store holds this dataset's ids under ``tokenization`` already."""
        return (self.folder / f"tokens-{tokenization.fingerprint}.arrow").is_file()

    def tokens(self, tokenization: Tokenization) -> pa.Table:
        """Every record's token ids under ``tokenization``: built once per dataset and contract, in batches
        (``Tokenization.pairs``), with progress lines, then read from the store by every later process."""
        path = self.folder / f"tokens-{tokenization.fingerprint}.arrow"
        if not path.is_file():
            started = time.monotonic()
            _write_arrow(path, TOKENS_SCHEMA, self._token_batches(tokenization), self.rows, f"tokenizing {self.source}")
            _finished(
                started, f"tokenized {self.source}: {self.rows} {self.kind} records (kept for every stage and run)"
            )
        return _read_arrow(path)

    def derived(self, name: str, build: Callable[[], Iterable[pa.Table]]) -> Path:
        """The path of table ``name`` derived from this dataset (a stage's training rows), written the first
        time, atomically, from the parts ``build`` yields (one per batch of rows, so that it streams);
        ``name`` must say everything the table depends on."""
        path = self.folder / f"{name}.arrow"
        if not path.is_file():
            parts = iter(build())
            first = next(parts, None)
            if first is None:
                raise DataError(f"{self.source}: {name}: no rows")
            batches = (batch for part in itertools.chain([first], parts) for batch in part.to_batches())
            _write_arrow(path, first.schema, batches, None, name)
        return path

    def _token_batches(self, tokenization: Tokenization) -> Iterator[dict[str, list[Any]]]:
        fields = RESPONSE_FIELDS.get(self.kind)
        first = 0
        for batch in self.table().select(["record"]).to_batches(BATCH_ROWS):
            records = [json.loads(text) for text in batch.column(0).to_pylist()]
            yield tokenized_batch(records, fields, tokenization, first, self.source, self.location)
            first += len(records)


def tokenized_batch(
    records: list[Record],
    fields: tuple[str, ...] | None,
    tokenization: Tokenization,
    first: int = 0,
    source: str = "",
    where: Callable[[int], str] | None = None,
) -> dict[str, list[Any]]:
    """``{"prompt_ids": [...], "response_ids": [[...], ...]}`` of ``records``, one entry per record, with
    one response per field of ``fields`` (``formats.RESPONSE_FIELDS``; None: a ranked record's
    candidates). A record the tokenizer cannot render raises ``DataError`` naming it: ``where(first + i)``
    (a stored dataset's ``location``: the file's line or row), else ``record first + i + 1``."""
    prompts, responses, owner = [], [], []
    for i, record in enumerate(records):
        record_prompts, record_responses = _rows_of(record, fields)  # prompt-only: its prompt and ""
        prompts += record_prompts
        responses += record_responses
        owner += [i] * len(record_prompts)
    try:
        encoded = tokenization.pairs(prompts, responses)
    except ValueError:  # TokenizationError: find the record, one by one, for the message
        for i, record in enumerate(records):
            try:
                tokenization.pairs(*_rows_of(record, fields))
            except ValueError as err:
                place = where(first + i) if where is not None else f"record {first + i + 1}"
                raise DataError(f"{source}: {place}: {err}") from None
        raise
    prompt_ids: list[list[int]] = [[] for _ in records]
    response_ids: list[list[list[int]]] = [[] for _ in records]
    for i, (prompt_part, response_part) in zip(owner, encoded):
        prompt_ids[i] = prompt_part
        if fields != ():
            response_ids[i].append(response_part)
    return {"prompt_ids": prompt_ids, "response_ids": response_ids}


def _rows_of(record: Record, fields: tuple[str, ...] | None) -> tuple[list[Prompt], list[str]]:
    prompt = record["query"] if fields is None else record["prompt"]
    texts = list(record["responses"]) if fields is None else [record[f] for f in fields]
    return [prompt] * max(len(texts), 1), texts or [""]


def stored(source: str, columns: dict[str, str], kind: str, task_cfg: TaskSection) -> StoredDataset:
    """The store's copy of ``source`` read as ``kind``: found by content, else validated and written now
    (with progress lines). Raises ``DataError`` for a missing or unreadable file and for a bad row."""
    return _stored(source, tuple(sorted(columns.items())), kind, task_cfg, _file_stamp(source))


def _file_stamp(source: str) -> tuple[int, int] | None:
    """(modification time, size) of a dataset file, so an edited file is read again; None otherwise."""
    try:
        stat = Path(source).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=32)
def _stored(
    source: str,
    columns: tuple[tuple[str, str], ...],
    kind: str,
    task_cfg: TaskSection,
    stamp: tuple[int, int] | None,
) -> StoredDataset:
    rows, unit, identity = _open(source, dict(columns), kind, task_cfg)
    key = hashlib.sha256(json.dumps([STORE_VERSION, _code_digest(), kind, columns, identity]).encode()).hexdigest()
    folder = rlhf_home() / "datasets" / key[:24]
    if not (folder / "meta.json").is_file():
        _build(folder, rows, source, kind, dict(columns), lambda: _open(source, dict(columns), kind, task_cfg)[2])
    meta = json.loads((folder / "meta.json").read_text())
    return StoredDataset(folder, source, kind, meta["digest"], meta["rows"], unit)


def _open(
    source: str, columns: dict[str, str], kind: str, task_cfg: TaskSection
) -> tuple[Callable[[], Iterable[tuple[int, Any]]], str, Any]:
    """(the rows as (location, row) pairs, the unit of location, the content's identity) of a source."""
    if source == "builtin":
        identity = [task_cfg.model_dump(mode="json")]
        return lambda: enumerate(_builtin_records(kind, task_cfg), start=1), "record", identity
    if source.startswith("hf:"):
        dataset = _hf_dataset(source)
        return lambda: enumerate(dataset, start=1), "row", [source, dataset._fingerprint]
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data.{kind}: {source}: no such file (expected builtin, a .jsonl/.parquet file or hf:NAME)")
    if path.suffix not in (".jsonl", ".parquet"):
        raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
    reader = _jsonl_rows if path.suffix == ".jsonl" else _parquet_rows
    return lambda: reader(path), "line" if path.suffix == ".jsonl" else "row", [_file_digest(path)]


def _build(
    folder: Path,
    rows: Callable[[], Iterable[tuple[int, Any]]],
    source: str,
    kind: str,
    columns: dict,
    identity: Callable[[], Any],
) -> None:
    """Validate every row of ``source`` into ``folder`` (records.arrow, then meta.json), atomically; a
    file that changed while it was read (``identity`` differs after) is refused, not stored."""
    before = identity()
    started = time.monotonic()
    digest = hashlib.sha256(b"[")
    count = 0

    def batches() -> Iterator[dict[str, list[Any]]]:
        nonlocal count
        batch: dict[str, list[Any]] = {name: [] for name in RECORDS_SCHEMA.names}
        for location, row in rows():
            try:
                record = to_record(_renamed(row, columns), kind)
            except FormatError as err:
                unit = "line" if source.endswith(".jsonl") else "row"
                raise DataError(f"{source}: {unit} {location}: {err}") from None
            text = json.dumps(record, sort_keys=True)
            digest.update((", " if count else "").encode() + text.encode())
            count += 1
            _add(batch, record, text, location, kind)
            if len(batch["record"]) == BATCH_ROWS:
                yield batch
                batch = {name: [] for name in RECORDS_SCHEMA.names}
        if batch["record"]:
            yield batch

    folder.parent.mkdir(parents=True, exist_ok=True)
    _sweep(folder.parent)
    staging = folder.parent / _temporary_name(folder.name)
    staging.mkdir()
    try:
        _write_arrow(staging / "records.arrow", RECORDS_SCHEMA, batches(), None, f"reading {source}")
        if count == 0:
            raise DataError(f"{source}: no {kind} records")
        if identity() != before:
            raise DataError(f"{source}: the file changed while it was read; run again once it is written")
        digest.update(b"]")
        meta = {"source": source, "kind": kind, "rows": count, "digest": digest.hexdigest()[:16]}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not another process publishing the same content first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _finished(started, f"read {source}: {count} valid {kind} records (kept for every stage and run)")


def _add(batch: dict[str, list[Any]], record: Record, text: str, location: int, kind: str) -> None:
    prompt = record["query"] if kind == "ranked" else record["prompt"]
    responses = record["responses"] if kind == "ranked" else [record[f] for f in RESPONSE_FIELDS[kind]]
    batch["record"].append(text)
    batch["location"].append(location)
    batch["prompt_key"].append(prompt_key(prompt))
    batch["prompt_bytes"].append(len(prompt_text(prompt).encode()))
    batch["response_bytes"].append(max((len(r.encode()) for r in responses), default=0))
    batch["messages"].append(len(prompt) if isinstance(prompt, list) else 0)


def _write_arrow(
    path: Path,
    schema: pa.Schema,
    batches: Iterable[dict[str, list[Any]] | pa.RecordBatch],
    total: int | None,
    what: str,
) -> None:
    """Write record batches to ``path`` through a temporary file renamed into place, with progress lines."""
    _sweep(path.parent)
    partial = path.with_name(_temporary_name(path.name))
    started = last = time.monotonic()
    done = 0
    try:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in batches:
                arrow = batch if isinstance(batch, pa.RecordBatch) else pa.record_batch(batch, schema=schema)
                writer.write_batch(arrow)
                done += arrow.num_rows
                if time.monotonic() - last >= REPORT_EVERY_S:
                    last = time.monotonic()
                    of = f"/{total}" if total else ""
                    _announce(f"{what}: {done}{of} records ({done / (last - started):.0f}/s, {last - started:.0f}s)")
        with partial.open("rb") as written:  # on disk before it has its final name: a crash leaves no torn table
            os.fsync(written.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _temporary_name(name: str) -> str:
    """A name no other process writes: this host's and this process's (ranks on several machines may share
    ``$RLHF_HOME``), hidden, ending in ``.tmp``."""
    return f".{name}.{socket.gethostname()}.{os.getpid()}.tmp"


def _sweep(folder: Path) -> None:
    """Remove the temporary files and folders that processes of this host left when they were killed."""
    host = socket.gethostname()
    for leftover in folder.glob(f".*.{host}.*.tmp"):
        pid = leftover.name.removesuffix(".tmp").rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_arrow(path: Path) -> pa.Table:
    """A table the store wrote, memory-mapped: Arrow's IPC stream format, which HF ``datasets`` also reads
    without a copy (``datasets.Dataset.from_file``)."""
    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


def _finished(started: float, line: str) -> None:
    """The closing line of a phase that took long enough to be reported while it ran (a small dataset
    stays silent, so a bad row's error is the only line)."""
    took = time.monotonic() - started
    if took >= FINISHED_LINE_AFTER_S:
        _announce(f"{line} in {took:.1f}s")


def _announce(line: str) -> None:
    """A progress line on stderr (a stage's log, the terminal), from the main rank only."""
    if progress_mode() != "off":
        print(line, file=sys.stderr, flush=True)


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """The code that turns rows into records: a change to it reads every dataset again."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("formats.py", "arithmetic.py", "dataset_store.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _builtin_records(kind: str, task_cfg: TaskSection) -> list[Record]:
    builders: dict[str, Callable[[TaskSection], list[Record]]] = {
        "sft": arithmetic.sft_records,
        "preferences": arithmetic.preference_records,
        "eval": arithmetic.eval_records,
        "prompts": arithmetic.prompt_records,
        "ranked": arithmetic.ranked_records,
    }
    return builders[kind](task_cfg)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
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


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, pa.ArrowException) as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet file ({err})") from None


def _hf_dataset(source: str) -> Any:
    import datasets

    name, _, split = source.removeprefix("hf:").partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # offline, unknown name, unknown split: all one actionable message
        raise DataError(f"{source}: cannot load HF dataset {name!r} split {split or 'train'!r} ({err})") from None


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
