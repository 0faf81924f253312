"""Where a stage computes: the one device its backbone, adapters, heads and every tensor it makes live on.

``backbone.device`` chooses it (``auto``: CUDA when a GPU is visible, else the CPU). It is resolved in
one place, here; the backbone is loaded onto it, and everything else follows the model: a stage asks
``model_device(model)`` and passes that ``device=`` to each tensor it creates, so nothing is created on
the default device and moved later (``tests/device_double.py`` fails a stage that does).

Under ``accelerate launch`` each rank takes the GPU of its local rank (``LOCAL_RANK``), as DeepSpeed's
engine does (pre-flight refuses more ranks than GPUs). The flow shows each stage process the GPUs it
may use (``visible_gpus_env``): none for ``backbone.device: cpu`` on a GPU machine, so accelerate and
DeepSpeed pick the CPU too, and one for a local stage.

The torch-free facts (is a GPU visible, how many, which device ``backbone.device`` resolves to, what a
stage process may see, how many threads it takes) are ``stages.io.devices``: the flow reads them too.
"""

from __future__ import annotations

import os

import torch

from stages.io.config import BackboneSection
from stages.io.devices import cpu_model, device_type


def stage_device(cfg: BackboneSection) -> torch.device:
    """The device this process loads the backbone onto: ``cuda:<LOCAL_RANK>`` or ``cpu``."""
    if device_type(cfg) == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's (first) parameter: where a stage creates the tensors it feeds the model."""
    return next(model.parameters()).device


def host_facts(threads: int) -> dict[str, str | int]:
    """The machine a stage computed on, for its manifest and the quality tier: the CPU model, the ISA level
    torch's CPU kernels dispatch to (``AVX2``, ``AVX512``, ...) and the torch threads. Learning outcomes of
    marginal settings differ between CPUs with the same seeds (issue 27): figures name their host."""
    return {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "threads": threads}
