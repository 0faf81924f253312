"""A test double of an accelerator, for CPU-only machines.

On a GPU the model lives on ``cuda`` while a tensor created without a ``device`` lands on the CPU, and
the first operation that mixes the two fails ("Expected all tensors to be on the same device"). Here the
model stays on the CPU and :class:`ForeignDefaultDevice` moves the *default* instead: every tensor that
project code (a frame under ``stages/``) creates without naming a device is created on the ``meta``
device. It is then on another device than the model, exactly as a forgotten ``device=`` would be on a
GPU, and the stage fails at the same operation.

Tensors created by libraries for themselves (transformers, PEFT, torch.optim's CPU step counters) keep
their own defaults: the frame that decides is the first one outside ``torch/nn``, so a head built in
stage code with ``torch.nn.Linear(...)`` (whose ``torch.empty`` runs in ``torch/nn``) counts as the
stage's, while an optimizer's bookkeeping does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PROJECT_CODE = str(Path(__file__).resolve().parents[1] / "stages")
TORCH_NN = str(Path(torch.nn.__file__).parent)
THIS_FILE = str(Path(__file__).resolve())
# Functions that create a tensor from sizes or Python data; *_like, cat, stack and .to() follow their inputs.
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.randperm,
    torch.linspace,
    torch.eye,
    torch.scalar_tensor,
}


class ForeignDefaultDevice(TorchFunctionMode):
    """Within ``with ForeignDefaultDevice():``, project code's device-less tensors are created on ``meta``.

    ``created`` counts the tensors it redirected (0 after a stage means the stage names every device).
    """

    def __init__(self) -> None:
        super().__init__()
        self.created = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None and _called_from_project_code():
            kwargs["device"] = "meta"
            self.created += 1
        return func(*args, **kwargs)


def _looked_through(filename: str) -> bool:
    return filename.startswith(TORCH_NN) or filename == THIS_FILE  # torch.nn's own frames, and this mode's


def _called_from_project_code() -> bool:
    """Whether the factory call being intercepted was made by project code, looking through torch.nn
    (a module built in stage code counts as the stage's)."""
    frame = sys._getframe(2)  # the caller of __torch_function__
    while frame is not None and _looked_through(frame.f_code.co_filename):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PROJECT_CODE)
