"""Where a stage computes: the one device its backbone, adapters, heads and every tensor it makes live on.

``backbone.device`` chooses it (``auto``: CUDA when a GPU is visible, else the CPU). It is resolved in
one place, here; the backbone is loaded onto it, and everything else follows the model: a stage asks
``model_device(model)`` and passes that ``device=`` to each tensor it creates, so nothing is created on
the default device and moved later (``tests/device_double.py`` fails a stage that does).

Under ``accelerate launch`` each rank takes the GPU of its local rank (``LOCAL_RANK``), as DeepSpeed's
engine does. A CPU device on a GPU machine is made real by hiding the GPUs from the stage's processes
(``hidden_gpus_env``), so accelerate and DeepSpeed pick the CPU too.

This module imports torch only inside its functions, so configs and the CLI stay torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from stages.io.config import BackboneSection, ConfigError

if TYPE_CHECKING:
    import torch

DeviceType = Literal["cpu", "cuda"]


def cuda_available() -> bool:
    """Whether a CUDA device is visible; torch is imported only where an NVIDIA driver is."""
    if not Path("/proc/driver/nvidia/version").exists() or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    import torch

    return torch.cuda.is_available()


def device_type(cfg: BackboneSection, cuda: bool | None = None) -> DeviceType:
    """``backbone.device`` resolved: "cuda" or "cpu". ``cuda`` (whether a GPU is visible) is asked when None.

    Raises:
        ConfigError: ``backbone.device: cuda`` where no CUDA device is visible.
    """
    cuda = cuda_available() if cuda is None else cuda
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("backbone.device: cuda, but no CUDA device is visible here (check the driver and "
                          "CUDA_VISIBLE_DEVICES), or set backbone.device: auto or cpu")
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"


def stage_device(cfg: BackboneSection) -> "torch.device":
    """The device this process loads the backbone onto: ``cuda:<LOCAL_RANK>`` or ``cpu``."""
    import torch

    if device_type(cfg) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def model_device(model: "torch.nn.Module") -> "torch.device":
    """The device of a model's (first) parameter: where a stage creates the tensors it feeds the model."""
    return next(model.parameters()).device


def hidden_gpus_env(cfg: BackboneSection) -> dict[str, str]:
    """Environment for a stage process that must compute on the CPU on a GPU machine: no GPU visible,
    and DeepSpeed told to use its CPU accelerator. Empty where the stage uses the GPU (or none exists)."""
    if cfg.device != "cpu" or not cuda_available():
        return {}
    return {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
