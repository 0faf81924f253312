"""The command lines that start a stage: ``python -m stages.training.entry <stage>`` locally, or
``accelerate launch`` of it on DeepSpeed ZeRO (``launcher: accelerate``), with the thread budget each rank gets."""

from __future__ import annotations

import os
import sys

from stages.io.artifacts import ArtifactError
from stages.io.config import DEEPSPEED_PRESETS, ConfigError, PipelineConfig
from stages.io.data import DataError
from stages.io.deepspeed_config import INFRA, check_launch, deepspeed_config_path
from stages.io.devices import visible_gpus_env

# The module a stage process starts in (``python -m stages.training.entry <stage> ...``): it sets the
# process up, then imports the stage's recipe. A name, not an import: the flow never imports torch.
STAGE_ENTRY = "stages.training.entry"


class StageFailed(RuntimeError):
    """A stage process exited non-zero; the message carries its last lines and the log's path."""


# The errors the flow's own process raises for the user to fix (config, data, a missing artifact or
# backbone): printed as one line (exit 2 from the CLI), a failed task without a traceback in Prefect.
USER_ERRORS = (ConfigError, DataError, ArtifactError)


def accelerate_command(stage: str, cfg: PipelineConfig, stage_args: list[str], machine_rank: int = 0) -> list[str]:
    """``accelerate launch`` of the stage process (``STAGE_ENTRY``) with the configured DeepSpeed preset."""
    dist = cfg.distributed
    check_launch(stage, cfg)  # fail before launching anything
    preset = dist.deepspeed if dist.deepspeed in DEEPSPEED_PRESETS else "zero2"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(INFRA / "accelerate" / f"{preset}.yaml"),
        "--deepspeed_config_file",
        str(deepspeed_config_path(dist)),
        "--num_processes",
        str(dist.num_processes),
        "--num_machines",
        str(dist.num_machines),
        "--machine_rank",
        str(machine_rank),
        "--main_process_port",
        str(dist.main_process_port or _free_port()),
        "--rdzv_conf",
        f"timeout={dist.join_timeout_s}",
    ]
    if dist.main_process_ip:
        command += ["--main_process_ip", dist.main_process_ip]
    return [*command, "-m", STAGE_ENTRY, stage, *stage_args]


def launch_env(cfg: PipelineConfig, stage: str) -> dict[str, str]:
    """Environment for a stage's processes. Ranks of ``accelerate launch`` get one thread budget each
    (more threads than cores makes CPU ranks crawl); with ``backbone.device: cpu`` on a GPU machine no
    GPU is visible to the stage, and a local stage sees one GPU (``visible_gpus_env``)."""
    launched = cfg.launcher(stage) == "accelerate"
    env = {**os.environ, **visible_gpus_env(cfg.backbone, launched)}
    if launched:
        threads = str(cfg.distributed.threads_per_process)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def _free_port() -> int:
    """A port nothing listens on now, so concurrent single-machine launches never collide on 29500."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
