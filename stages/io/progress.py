"""Progress of a long loop: a tqdm bar where a person watches a terminal, periodic plain lines where the
output goes to a file (stage logs, CI), and nothing on the ranks other than the main one.

A stage launched by the flow writes into a pipe even when the user watches a terminal, so the flow
says which it is through ``RLHF_PROGRESS`` (``bars`` or ``lines``); a stage run by hand decides from
its own stderr. Plain lines never carry cursor movements, so nested loops (generation inside a
training step) leave no ``\\x1b[A`` debris in a log.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
PROGRESS_ENV = "RLHF_PROGRESS"
LINE_EVERY_S = (
    10.0  # a plain line at most this often (and at the end of a loop that is kept): logs never go quiet for long
)


def progress_mode() -> str:
    """``bars``, ``lines`` or ``off`` (ranks other than the main one of an ``accelerate launch``)."""
    if os.environ.get("RANK", "0") != "0":
        return "off"
    chosen = os.environ.get(PROGRESS_ENV)
    if chosen in ("bars", "lines"):
        return chosen
    return "bars" if sys.stderr.isatty() else "lines"


def progress(
    iterable: Iterable[T], *, desc: str, unit: str, total: int | None = None, initial: int = 0, leave: bool = True
) -> Iterable[T]:
    """Iterate ``iterable`` and report progress on stderr. ``initial`` items were done before (a resumed
    loop); ``leave=False`` (an inner loop) keeps no final line."""
    mode = progress_mode()
    if mode == "off":
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)  # type: ignore[arg-type]
    if mode == "bars":
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, leave=leave)
    return _plain_lines(iterable, desc, unit, total, initial, leave)


def _plain_lines(
    iterable: Iterable[T], desc: str, unit: str, total: int | None, initial: int, leave: bool
) -> Iterator[T]:
    started = last = time.monotonic()
    done = initial
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LINE_EVERY_S or (leave and done == total):
            of = f"/{total}" if total is not None else ""
            rate = (done - initial) / max(now - started, 1e-9)
            print(f"{desc}: {unit} {done}{of} ({rate:.2f}/s, {now - started:.0f}s)", file=sys.stderr, flush=True)
            last = now
