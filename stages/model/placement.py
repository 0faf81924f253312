"""Where a stage computes: the one device its backbone, adapters, heads and every tensor it makes live on.

``backbone.device`` chooses it (``auto``: CUDA when a GPU is visible, else the CPU). It is resolved in
one place, here; the backbone is loaded onto it, and everything else follows the model: a stage asks
``model_device(model)`` and passes that ``device=`` to each tensor it creates, so nothing is created on
the default device and moved later (``tests/device_double.py`` fails a stage that does).

Under ``accelerate launch`` each rank takes the GPU of its local rank (``LOCAL_RANK``), as DeepSpeed's
engine does (pre-flight refuses more ranks than GPUs). The flow shows each stage process the GPUs it
may use (``visible_gpus_env``): none for ``backbone.device: cpu`` on a GPU machine, so accelerate and
DeepSpeed pick the CPU too, and one for a local stage.

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
    """Whether a CUDA device is visible; torch is imported only where an NVIDIA driver is (Linux, or
    WSL2's ``/dev/dxg``), so the CLI stays quick on CPU machines."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    if not (Path("/proc/driver/nvidia/version").exists() or Path("/dev/dxg").exists()):
        return False
    import torch

    return torch.cuda.is_available()


def gpu_count() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    if not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


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


def visible_gpus_env(cfg: BackboneSection, launched: bool) -> dict[str, str]:
    """What a stage process may see of the machine's GPUs.

    * ``backbone.device: cpu`` on a GPU machine: none, and DeepSpeed told to use its CPU accelerator,
      so accelerate and DeepSpeed compute on the CPU too.
    * A local (not ``launched``) stage on CUDA: one GPU, the first visible one. Seeing several, the HF
      Trainer would wrap SFT in ``DataParallel`` and multiply its batch by the GPU count, a result
      that would depend on the machine.

    Empty where nothing needs hiding (``accelerate launch`` gives each rank its GPU by ``LOCAL_RANK``).
    """
    if not cuda_available():
        return {}
    if cfg.device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    if launched:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {"CUDA_VISIBLE_DEVICES": visible.split(",")[0] if visible else "0"}
