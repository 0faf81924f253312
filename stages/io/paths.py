"""Where state lives: ``$RLHF_HOME`` (default ``./.rlhf``) holds backbones, the cache and Prefect."""

from __future__ import annotations

import os
from pathlib import Path


def rlhf_home() -> Path:
    return Path(os.environ.get("RLHF_HOME", ".rlhf")).resolve()
