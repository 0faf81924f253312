"""Prefect settings for a self-contained run: local ephemeral mode, state inside ``$RLHF_HOME``.

Must run before ``prefect`` is imported, because Prefect reads its settings at import time. Values a
user already set (for example ``PREFECT_API_URL`` pointing at a real server) win.
"""

from __future__ import annotations

import os

from stages import paths


def configure_prefect() -> None:
    home = paths.rlhf_home()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary local server can take a while to come up on a loaded 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
