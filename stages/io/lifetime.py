"""A child process that dies with its parent, so no trainer outlives what started it.

The flow starts each stage's launcher (``flows.stage_task``), and ``accelerate launch`` starts its ranks
in sessions of their own (torch's elastic agent): a ``kill -9`` of either parent would otherwise leave
children training, which later publish over (or race) a rerun's artifact. Linux ``prctl(PR_SET_PDEATHSIG)``;
elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies; exit at once if the parent
    is already gone (it may die between this process's start and the request)."""
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
