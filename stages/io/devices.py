"""What the machine offers a stage, read without importing torch on a CPU machine: whether a GPU is visible
and how many, which device ``backbone.device`` resolves to, what a stage process may see of the GPUs,
and how many threads a local stage takes. The flow reads these (launch, pre-flight, the DeepSpeed launch
key) as well as the stage; ``stages.model.placement`` puts the model and its tensors on the device.

torch is imported (inside ``cuda_available``) only where an NVIDIA driver is: counting GPUs needs CUDA's
own view of the machine (``CUDA_VISIBLE_DEVICES``, MIG), which no file holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from stages.io.config import BackboneSection, ConfigError

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
        raise ConfigError(
            "backbone.device: cuda, but no CUDA device is visible here (check the driver and "
            "CUDA_VISIBLE_DEVICES), or set backbone.device: auto or cpu"
        )
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"


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


def stage_threads(requested: int | Literal["auto"], cores: int | None = None, busy: float | None = None) -> int:
    """Torch threads for a local stage process: ``requested``, or for ``auto`` the cores that no other
    process is using as the stage starts (at least 1).

    Why not every core: torch's OpenMP threads meet at a barrier after each parallel region, so one
    thread descheduled by a neighbouring job stalls all of them, and libgomp's waiting threads spin on
    the cores the neighbour needs. Beside a CPU-bound job on 2 cores the default PPO stage ran 22x
    slower with 2 threads (``bench/neighbour.py``); with one thread per free core it does not.

    ``cores`` (default: this process's CPU affinity) and ``busy`` (default: ``busy_cores()``) are for tests.
    """
    if requested != "auto":
        return requested
    cores = cores if cores is not None else available_cores()
    busy = busy if busy is not None else busy_cores()
    return max(1, min(cores, round(cores - busy)))


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows, else "unknown"."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores(window_s: float = 0.1) -> float:
    """Cores kept busy by every process of the machine over ``window_s`` seconds (Linux ``/proc/stat``;
    this process sleeps meanwhile, so it counts nothing of its own). 0.0 where ``/proc/stat`` is missing."""
    import time

    def sample() -> tuple[int, int, int]:  # (busy, total) jiffies over all CPUs, and the CPU count
        lines = Path("/proc/stat").read_text().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields), sum(1 for line in lines if line.startswith("cpu") and line[3].isdigit())

    try:
        busy0, total0, cpus = sample()
        time.sleep(window_s)
        busy1, total1, _ = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return cpus * (busy1 - busy0) / max(total1 - total0, 1)
