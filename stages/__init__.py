"""Stages of the chain (one module each) and the shared pieces they are built from."""

import os as _os

# In a rank other than the main one of an `accelerate launch` job, before anything imports tqdm:
# one progress bar per stage, the main rank's.
if _os.environ.get("RANK", "0") != "0":
    _os.environ.setdefault("TQDM_DISABLE", "1")
