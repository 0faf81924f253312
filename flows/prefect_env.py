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

        SubprocessASGIServer().start()

    thread = threading.Thread(target=boot, name="prefect-server-boot", daemon=True)
    thread.start()
    return thread.join
