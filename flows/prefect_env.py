"""Prefect settings for a self-contained run: local ephemeral mode, state inside ``$RLHF_HOME``.

Must run before ``prefect`` is imported, because Prefect reads its settings at import time. Values a
user already set (for example ``PREFECT_API_URL`` pointing at a real server) win.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from stages.io import paths


def configure_prefect() -> None:
    home = paths.rlhf_home()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary local server can take a while to come up on a loaded 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def start_server_early() -> Callable[[], None]:
    """Boot Prefect's temporary server in the background now; return the function that waits for it.

    Booting it takes ~4 s (a uvicorn child process importing Prefect's server), which Prefect would
    otherwise spend at the first API call. Started first, it overlaps our own start-up and preflight.
    The caller must wait before running a flow: Prefect reuses this (singleton) server once it is up.
    """
    if os.environ.get("PREFECT_API_URL"):  # a real server is configured: nothing to boot
        return lambda: None

    def boot() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        if server.server_process is not None:
            stop_with_this_process(server.server_process.pid)

    thread = threading.Thread(target=boot, name="prefect-server-boot", daemon=True)
    thread.start()
    return thread.join


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

    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
