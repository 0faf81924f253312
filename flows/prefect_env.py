"""Prefect settings for a self-contained run: local ephemeral mode, state inside ``$RLHF_HOME``.

Must run before ``prefect`` is imported, because Prefect reads its settings at import time. Values a
user already set (for example ``PREFECT_API_URL`` pointing at a real server) win.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stages.io import paths

if TYPE_CHECKING:
    import subprocess

    from filelock import BaseFileLock


def configure_prefect() -> None:
    home = paths.rlhf_home()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary local server can take a while to come up on a loaded 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def start_server_early() -> Callable[[], None]:
    """Start Prefect's temporary API server now, in a child process, and point this process's Prefect
    at it (``PREFECT_API_URL``); return the function that waits until it answers.

    It is the server Prefect's own ``SubprocessASGIServer`` would start at the flow's first API call
    (uvicorn serving ``create_app`` in ephemeral mode, UI off), launched without importing Prefect here:
    that import alone takes ~4.5 s on 2 cores and the child's start ~6 s more, both of which now overlap
    our own start-up and pre-flight. The server is stopped when this process exits: SIGTERM at
    interpreter exit, and the watchdog (``stop_with_this_process``) for a process that is killed.

    Raises (from the returned function) ``RuntimeError`` when the server exits or does not answer
    within ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``.
    """
    import atexit
    import subprocess
    import sys
    from importlib.util import find_spec

    if os.environ.get("PREFECT_API_URL"):  # a real server is configured: nothing to start
        return lambda: None
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    creating = _lock_unless_migrated(timeout)
    spec = find_spec("prefect")
    assert spec is not None and spec.submodule_search_locations, "prefect is not installed"
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(spec.submodule_search_locations[0]).parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
        stdin=subprocess.DEVNULL,
    )
    stop_with_this_process(server.pid)
    atexit.register(server.terminate)  # no wait: the watchdog kills it if it outlives us by 5 s
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    os.environ.setdefault("PREFECT_UI_URL", "")  # no "View at" links: this server has no UI and ends with the run

    api_url = os.environ["PREFECT_API_URL"]
    if creating is None:
        return lambda: _wait_until_healthy(server, api_url, timeout)
    # Creating the database: release the lock the moment the server is healthy, not when this command
    # next asks (its pre-flight may build the backbone for minutes while the other commands wait).
    failed: list[BaseException] = []
    created = threading.Thread(target=_create_database, args=(server, api_url, timeout, creating, failed), daemon=True)
    created.start()

    def ready() -> None:
        created.join()
        if failed:
            raise failed[0]

    return ready


def _create_database(
    server: subprocess.Popen[bytes], api_url: str, timeout: float, lock: BaseFileLock, failed: list[BaseException]
) -> None:
    """Wait until ``server`` answers (its start-up has created and migrated the database), mark the database
    migrated, and release ``lock`` whatever happens; an error is appended to ``failed``."""
    try:
        _wait_until_healthy(server, api_url, timeout)
        _migrated_marker().write_text(_prefect_version())
    except BaseException as err:  # handed to ready(), in the command's own thread
        failed.append(err)
    finally:
        lock.release()


def _lock_unless_migrated(timeout: float) -> BaseFileLock | None:
    """The lock on creating Prefect's database, held from here until this process's server answers, or None
    when a server of this Prefect version has already created and migrated it (the usual case).

    Every ``rlhf`` command starts a temporary server on the one SQLite file in ``$PREFECT_HOME``, and each
    server creates and migrates the database as it starts: two commands started at once on a fresh home
    raced, and one died with ``no such table: flow_run_alert_policy`` (Prefect #18934, #19771). The first
    takes this lock; the others wait for its server, then find the database ready.

    Raises ``RuntimeError`` when another process holds the lock for more than twice ``timeout`` seconds.
    """
    from filelock import FileLock, Timeout

    if _migrated():
        return None
    # Released by _create_database's thread, not the one that acquires it.
    lock = FileLock(str(Path(os.environ["PREFECT_HOME"]) / ".rlhf-database.lock"), thread_local=False)
    try:  # the holder gives up after ``timeout``: waiting twice that never gives up first
        lock.acquire(timeout=2 * timeout)
    except Timeout:
        raise RuntimeError(
            f"another rlhf command has been creating Prefect's database in {os.environ['PREFECT_HOME']} "
            f"for {2 * timeout:.0f} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS x 2)"
        ) from None
    if _migrated():  # created while this process waited
        lock.release()
        return None
    return lock


def _migrated() -> bool:
    """Whether a server of this Prefect version created and migrated the database (its marker is current and
    the default database file exists, or the database lives elsewhere: PREFECT_API_DATABASE_CONNECTION_URL)."""
    marker = _migrated_marker()
    elsewhere = bool(os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"))
    return (
        marker.is_file()
        and marker.read_text() == _prefect_version()
        and (elsewhere or (marker.parent / "prefect.db").is_file())
    )


def _migrated_marker() -> Path:
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    return home / ".rlhf-database-migrated"


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")  # a new version may bring migrations: its first server takes the lock again


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(server: subprocess.Popen[bytes], api_url: str, timeout: float) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"Prefect's temporary server exited with code {server.returncode} while starting")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(
        f"Prefect's temporary server did not answer within {timeout:.0f} s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
    )


# Runs in its own small process: waits for the CLI process to end, however it ends, then stops the server.
# A pidfd names the server itself, not its pid number: a pid reused after the server ended is never hit.
_WATCHDOG = """
import os, select, signal, sys, time
parent = int(sys.argv[1])
try:
    server = os.pidfd_open(int(sys.argv[2]))
except ProcessLookupError:
    sys.exit()
while os.getppid() == parent:
    time.sleep(0.5)
try:
    signal.pidfd_send_signal(server, signal.SIGTERM)
    if not select.select([server], [], [], 5)[0]:  # readable once the server has exited
        signal.pidfd_send_signal(server, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def stop_with_this_process(pid: int) -> None:
    """Stop process ``pid`` when this process ends, even by ``kill -9``.

    Prefect stops its temporary server at interpreter exit (``atexit``), which a SIGKILL, an OOM kill or a
    preemption skips, leaving the uvicorn server running with no owner. A watchdog child notices its
    parent is gone (it is re-parented) and stops the server: SIGTERM, then SIGKILL after 5 s. Linux only
    (``os.pidfd_open``); elsewhere nothing is started. A kill while the server is still booting (the
    first seconds of a run) is not covered.
    """
    import subprocess
    import sys

    if not hasattr(os, "pidfd_open"):
        return

    subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
