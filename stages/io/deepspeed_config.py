"""The DeepSpeed config a stage runs under (``launcher: accelerate``): reading and checking it, the
launches that are refused, and what of it enters the cache key.

Pure (no torch): the flow checks launches and computes cache keys with it, the stage reads the config
it was started with. Presets are package data in ``infra/deepspeed/`` (the JSON DeepSpeed reads) and
``infra/accelerate/`` (the accelerate config ``flows.launch`` launches with).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import infra
from stages.io.config import DEEPSPEED_PRESETS, ConfigError, DistributedSection, PipelineConfig
from stages.io.devices import device_type, gpu_count
from stages.io.sections import needs_4bit
from stages.registry import spec

INFRA = Path(infra.__file__).resolve().parent  # package data, so a wheel install finds the presets


def deepspeed_config_path(dist: DistributedSection) -> Path:
    """The JSON file behind ``distributed.deepspeed``: a preset's file or the user's own path."""
    if dist.deepspeed in DEEPSPEED_PRESETS:
        return INFRA / "deepspeed" / f"{dist.deepspeed}.json"
    return Path(dist.deepspeed).expanduser().resolve()


def load_deepspeed_config(dist: DistributedSection) -> dict[str, Any]:
    """Read and check the DeepSpeed JSON; every problem is one ConfigError naming the file."""
    path = deepspeed_config_path(dist)
    try:
        config = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"distributed.deepspeed: cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"distributed.deepspeed: {path} line {err.lineno}: not valid JSON: {err.msg}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"distributed.deepspeed: {path}: the top level must be an object")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.deepspeed: {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_launch(stage: str, cfg: PipelineConfig) -> None:
    """Refuse, before anything starts, the launches that cannot work; see docs/architecture.md."""
    if cfg.launcher(stage) == "local":
        return
    per_machine = -(-cfg.distributed.num_processes // cfg.distributed.num_machines)
    if device_type(cfg.backbone) == "cuda" and per_machine > (gpus := gpu_count()):
        raise ConfigError(
            f"{stage}.launcher: accelerate starts {per_machine} ranks on this machine, one per GPU, but it has "
            f"{gpus} visible GPU(s); lower distributed.num_processes or set backbone.device=cpu"
        )
    stage_of_zero = zero_stage(load_deepspeed_config(cfg.distributed))
    if stage_of_zero == 3 and spec(stage).samples_while_training:
        raise ConfigError(
            f"{stage}.launcher: accelerate with ZeRO-3 ({cfg.distributed.deepspeed}) is not supported: {stage} samples "
            "from the policy every step, and ZeRO-3 shards the weights generation reads, so every token would "
            "gather the whole model over the network; use distributed.deepspeed=zero2 for this stage"
        )
    if stage_of_zero == 3 and needs_4bit(cfg.adapter.kind):
        raise ConfigError(
            "adapter.kind: qlora cannot run under ZeRO-3 (DeepSpeed cannot partition bitsandbytes "
            "4-bit weights); use zero2, or adapter.kind=lora with zero3"
        )


def launch_identity(stage: str, cfg: PipelineConfig) -> dict[str, Any]:
    """What of the launch changes a stage's result (its cache key): the device, the DeepSpeed config and
    the world size.

    Addresses and ports do not, so a run moved to other machines keeps its cache.
    """
    device = device_type(cfg.backbone)  # CPU and GPU kernels round differently: a result says where it was made
    if cfg.launcher(stage) == "local":
        return {"launcher": "local", "device": device}
    config = json.dumps(load_deepspeed_config(cfg.distributed), sort_keys=True)
    return {
        "launcher": "accelerate",
        "deepspeed": hashlib.sha256(config.encode()).hexdigest()[:16],
        "world_size": cfg.distributed.num_processes,
        "device": device,
    }


def is_distributed_process() -> bool:
    """True inside a rank started by ``accelerate launch`` / torchrun."""
    return "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ
