"""Runs whose process died: found by their lock, and marked crashed on disk and in Prefect.

A run's pipeline runs in the process that holds the run's lock (``flows.run_dir.run_lock``): ``rlhf run``,
``stage`` and ``resume``, a sweep's trial, a scheduled run. The OS releases the lock when that process dies,
however it dies. A ``kill -9``, an OOM kill or a preempted machine runs no handler, so ``status.json`` kept
saying ``running`` and the Prefect flow run stayed ``RUNNING``, and nothing told a live run from a dead one.

The next command that reads the run reconciles it (``reconcile``): ``rlhf runs``, ``rlhf report``,
``rlhf dashboard`` and every command that starts the run's pipeline again. Under the run's lock (so a run
that is finishing right now is never marked), each stage still ``running`` becomes ``crashed``, and the
invocation's flow run (``flow_runs.json``) gets ``crashed_at``. Prefect learns it as soon as an API is at
hand (``sync_prefect``): at once where ``PREFECT_API_URL`` names a server, else at the next command that
starts one (``rlhf run``, ``stage``, ``resume``, ``sweep``); the flow run is set ``Crashed``. When a later
invocation goes on with the run (``rlhf resume``), the crashed flow run names it (``record_flow_run``).
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import Timeout

from flows.run_dir import (
    CONFIG,
    CRASHED,
    FLOW_RUNS,
    RUNNING,
    read_flow_runs,
    read_status,
    record_status,
    run_lock,
    write_flow_runs,
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def reconcile(run_dir: Path, tell_prefect: bool = True) -> list[str]:
    """Mark the run's ``running`` stages ``crashed`` when no live process holds its lock; return them (empty
    for a live run or one with nothing running). With ``tell_prefect`` and ``PREFECT_API_URL`` set (a server a
    person runs), Prefect is told at once; a command that starts its own server tells it once it answers."""
    run_dir = Path(run_dir)
    if not any(entry["status"] == RUNNING for entry in read_status(run_dir).values()):
        return []
    lock = run_lock(run_dir)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return []  # its process lives
    try:
        # Read again under the lock: the process may have finished between the first read and the lock.
        running = [stage for stage, entry in read_status(run_dir).items() if entry["status"] == RUNNING]
        for stage in running:
            record_status(
                run_dir,
                stage,
                status=CRASHED,
                error=f"the process running the run is gone (killed, or its machine stopped); "
                f"`rlhf resume {run_dir.name}` finishes it",
            )
        flow_runs = read_flow_runs(run_dir)
        if running and flow_runs and "crashed_at" not in flow_runs[-1]:
            flow_runs[-1]["crashed_at"] = _now()
            write_flow_runs(run_dir, flow_runs)
    finally:
        lock.release()
    if running and tell_prefect and os.environ.get("PREFECT_API_URL"):
        sync_prefect(run_dir)
    return running


def reconcile_all(runs_dir: Path) -> list[str]:
    """``reconcile`` every run of ``runs_dir``; return the ids of the runs found crashed now. With
    ``PREFECT_API_URL`` set, Prefect also learns the crashes found earlier that it has not been told."""
    runs = [run.parent for run in sorted(Path(runs_dir).glob(f"*/{CONFIG}"))]
    crashed = [run.name for run in runs if reconcile(run, tell_prefect=False)]
    if os.environ.get("PREFECT_API_URL"):
        sync_prefect_all(runs_dir)
    return crashed


def sync_prefect_all(runs_dir: Path) -> None:
    """``sync_prefect`` for every run of ``runs_dir`` that has a crashed flow run Prefect was not told of."""
    for run in sorted(Path(runs_dir).glob(f"*/{FLOW_RUNS}")):
        if _pending(read_flow_runs(run.parent)):
            sync_prefect(run.parent)


def _pending(flow_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in flow_runs if "crashed_at" in entry and not entry.get("in_prefect")]


def sync_prefect(run_dir: Path) -> None:
    """Set each crashed flow run of the run ``Crashed`` in Prefect (``PREFECT_API_URL``), once; a server that
    does not answer leaves it for the next command (a warning, never an error).

    The requests run without the run's lock (a slow server must not keep a run from starting); the file is
    read again after them and only the entries told are marked, so an entry another process added meanwhile
    (a resume's own flow run) is kept."""
    pending = _pending(read_flow_runs(run_dir))
    if not pending:
        return
    told = set()
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            for entry in pending:
                client.set_flow_run_state(entry["id"], Crashed(message=_crash_message(run_dir, entry)), force=True)
                told.add(entry["id"])
    except Exception as err:  # a server that is down must not stop `rlhf runs`
        print(f"warning: could not mark run {Path(run_dir).name}'s flow run crashed in Prefect: {err}", flush=True)
    if told:
        flow_runs = read_flow_runs(run_dir)
        for entry in flow_runs:
            if entry["id"] in told:
                entry["in_prefect"] = True
        write_flow_runs(run_dir, flow_runs)


def _crash_message(run_dir: Path, entry: dict[str, Any]) -> str:
    resumed = f"; resumed by flow run {entry['resumed_by']}" if entry.get("resumed_by") else ""
    return (
        f"the process running run {Path(run_dir).name} (pid {entry['pid']} on {entry['host']}) was gone at "
        f"{entry['crashed_at']}: killed, or its machine stopped{resumed}"
    )


def record_flow_run(run_dir: Path, flow_run_id: str, name: str) -> None:
    """Add this invocation's flow run to the run's ``flow_runs.json`` (from inside the pipeline flow, with a
    Prefect API at hand). Earlier flow runs that crashed are set ``Crashed`` in Prefect if they are not yet,
    and now name this one as the flow run that resumed the run, in their state and an artifact."""
    flow_runs = read_flow_runs(run_dir)
    resumed = [entry for entry in flow_runs if "crashed_at" in entry and "resumed_by" not in entry]
    for entry in resumed:
        entry.update(resumed_by=f"{name} ({flow_run_id})", in_prefect=False)  # the state is set again, with it
    flow_runs.append(
        {"id": flow_run_id, "name": name, "started_at": _now(), "pid": os.getpid(), "host": socket.gethostname()}
    )
    write_flow_runs(run_dir, flow_runs)
    sync_prefect(run_dir)
    if resumed:
        _note_resumption(run_dir, resumed, flow_run_id, name)


def _note_resumption(run_dir: Path, resumed: list[dict[str, Any]], flow_run_id: str, name: str) -> None:
    """An artifact ``resumed-by`` on each crashed flow run, naming the flow run that resumed the run."""
    try:
        from uuid import UUID

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate

        with get_client(sync_client=True) as client:
            for entry in resumed:
                text = f"run {Path(run_dir).name} was resumed by flow run {name} ({flow_run_id})"
                client.create_artifact(
                    ArtifactCreate(
                        key="resumed-by",
                        type="markdown",
                        description=text,
                        data=f"**{text}** at {_now()}",
                        flow_run_id=UUID(entry["id"]),
                    )
                )
    except Exception as err:  # Prefect's record of an old run must not stop the new one
        print(f"warning: could not note the resumption on run {Path(run_dir).name}'s crashed flow run: {err}")
