"""How a stage is started: in this process (``launcher: local``) or by ``accelerate launch`` on DeepSpeed.

This module is pure (no torch): the flow uses it to build the launch command and the cache key, the
stage uses it to read the DeepSpeed config it was started with. Presets live in ``infra/deepspeed/``
(the JSON DeepSpeed reads) and ``infra/accelerate/`` (the accelerate config the flow launches with).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from stages.adapters import needs_4bit
from stages.config import DEEPSPEED_PRESETS, ConfigError, DistributedSection, PipelineConfig
from stages.registry import spec

INFRA = Path(__file__).resolve().parents[1] / "infra"


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
    stage_of_zero = zero_stage(load_deepspeed_config(cfg.distributed))
    if stage_of_zero == 3 and spec(stage).samples_while_training:
        raise ConfigError(
            f"{stage}.launcher: accelerate with ZeRO-3 ({cfg.distributed.deepspeed}) is not supported: {stage} samples "
            "from the policy every step, and ZeRO-3 shards the weights generation reads, so every token would "
            "gather the whole model over the network; use distributed.deepspeed=zero2 for this stage"
        )
    if stage_of_zero == 3 and needs_4bit(cfg.adapter.kind):
        raise ConfigError("adapter.kind: qlora cannot run under ZeRO-3 (DeepSpeed cannot partition bitsandbytes "
                          "4-bit weights); use zero2, or adapter.kind=lora with zero3")


def launch_identity(stage: str, cfg: PipelineConfig) -> dict[str, Any]:
    """What of the launch changes a stage's result (its cache key): the DeepSpeed config and world size.

    Addresses and ports do not, so a run moved to other machines keeps its cache.
    """
    if cfg.launcher(stage) == "local":
        return {"launcher": "local"}
    config = json.dumps(load_deepspeed_config(cfg.distributed), sort_keys=True)
    return {"launcher": "accelerate", "deepspeed": hashlib.sha256(config.encode()).hexdigest()[:16],
            "world_size": cfg.distributed.num_processes}


def accelerate_command(stage: str, cfg: PipelineConfig, stage_args: list[str], machine_rank: int = 0) -> list[str]:
    """``accelerate launch`` of ``python -m stages.<stage>`` with the configured DeepSpeed preset."""
    dist = cfg.distributed
    check_launch(stage, cfg)  # fail before launching anything
    preset = dist.deepspeed if dist.deepspeed in DEEPSPEED_PRESETS else "zero2"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(INFRA / "accelerate" / f"{preset}.yaml"),
        "--deepspeed_config_file", str(deepspeed_config_path(dist)),
        "--num_processes", str(dist.num_processes), "--num_machines", str(dist.num_machines),
        "--machine_rank", str(machine_rank), "--main_process_port", str(dist.main_process_port or _free_port()),
        "--rdzv_conf", f"timeout={dist.join_timeout_s}",
    ]
    if dist.main_process_ip:
        command += ["--main_process_ip", dist.main_process_ip]
    return [*command, "-m", spec(stage).module, *stage_args]


def launch_env(cfg: PipelineConfig) -> dict[str, str]:
    """Environment for the ranks: one thread budget each (more threads than cores makes CPU ranks crawl)."""
    threads = str(cfg.distributed.threads_per_process)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def is_distributed_process() -> bool:
    """True inside a rank started by ``accelerate launch`` / torchrun."""
    return "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ


def _free_port() -> int:
    """A port nothing listens on now, so concurrent single-machine launches never collide on 29500."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
