"""The memory preflight: estimate every stage's peak (``stages.memory.plan``), compare it with what this
machine has free now, print it (``rlhf plan``) or refuse a run that would not fit (``rlhf run``/``stage``).

Refusing is a ``ConfigError``: one line, exit status 2, with the change most likely to make it fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.io.config import ConfigError, PipelineConfig
from stages.io.devices import device_type
from stages.memory.inputs import (
    available_gpu_memory,
    available_host_memory,
    read_data_shape,
    read_model_shape,
    read_parallel,
)
from stages.memory.plan import Estimate, estimate, stage_workload
from stages.registry import spec

MiB, GiB = 1 << 20, 1 << 30
COLUMNS = ("weights", "adapters_optimizer", "activations", "logits", "kv_cache", "overhead")


@dataclass(frozen=True)
class MemoryPlan:
    estimates: list[Estimate]
    available_host: int | None  # bytes of host RAM available now (None: cannot be read here)
    available_gpu: int | None  # free bytes on the CUDA device (None: no stage trains on one)

    def fits(self, est: Estimate) -> bool | None:
        """Whether a stage fits: its host RAM over this machine's ranks, and per rank its GPU memory
        (None when the available memory cannot be read)."""
        checks = [(est.host_total, self.available_host)]
        if est.device == "cuda":
            checks.append((est.total, self.available_gpu))
        if any(free is None for _, free in checks):
            return None
        return all(need <= free for need, free in checks)  # type: ignore[operator]

    def available(self, est: Estimate) -> int | None:
        """What ``est.total`` is compared with: free GPU memory, or available host RAM."""
        return self.available_gpu if est.device == "cuda" else self.available_host


def plan_memory(cfg: PipelineConfig, stages: list[str] | None = None) -> MemoryPlan:
    """Estimates for ``stages`` (default: the run's), from the config, the backbone's config.json and the
    data's token lengths, and what this machine has available now."""
    shape, data, device = read_model_shape(cfg), read_data_shape(cfg), device_type(cfg.backbone)
    estimates = []
    for stage in stages or cfg.run.stages:
        parallel = read_parallel(cfg, stage)
        workload = stage_workload(stage, cfg, data, parallel)
        estimates.append(estimate(workload, shape, cfg.backbone.dtype, cfg.adapter, parallel, device))
    gpu = available_gpu_memory() if any(e.device == "cuda" for e in estimates) else None
    return MemoryPlan(estimates, available_host_memory(), gpu)


def check_memory(cfg: PipelineConfig, stages: list[str] | None = None) -> None:
    """Raise ``ConfigError`` (one line) for the first stage whose estimate exceeds what is available."""
    plan = plan_memory(cfg, stages)
    for est in plan.estimates:
        if plan.fits(est) is False:
            raise ConfigError(refusal(cfg, plan, est))


def refusal(cfg: PipelineConfig, plan: MemoryPlan, est: Estimate) -> str:
    """One line: what the stage needs, what is free, and what to change."""
    gpu = est.device == "cuda" and plan.available_gpu is not None and est.total > plan.available_gpu
    need, free, where = (
        (est.total, plan.available_gpu, "GPU memory per rank")
        if gpu
        else (est.host_total, plan.available_host, "host RAM")
    )
    return (
        f"stage {est.stage} needs about {_size(need)} of {where} at its {est.peak_phase} (estimate; "
        f"{_size(free or 0)} available): {suggestion(cfg, est)}; or pass --skip-memory-check to run it anyway"
    )


def suggestion(cfg: PipelineConfig, est: Estimate) -> str:
    """The change most likely to make ``est`` fit, naming config keys (with their current values)."""
    transient = est.activations + est.logits + est.kv_cache
    if transient >= est.weights + est.adapters_optimizer and est.knobs:
        return "lower " + " or ".join(f"{key} (now {_value(cfg, key)})" for key in est.knobs)
    if est.ranks > 1 and est.overhead * est.ranks > est.host_total // 2:
        return f"lower distributed.num_processes (now {cfg.distributed.num_processes}) or add machines"
    options = ["backbone.dtype=bfloat16"] if cfg.backbone.dtype == "float32" else []
    if est.device == "cuda" and cfg.adapter.kind != "qlora":  # on the CPU a 4-bit backbone saves no RAM
        options.append("adapter.kind=qlora (a 4-bit backbone)")
    if not spec(
        est.stage
    ).samples_while_training:  # ZeRO-3 is refused for stages that sample (stages.io.deepspeed_config)
        offload = "zero3_offload with more processes" if est.device == "cuda" else "zero3 over more machines"
        options.append(f"{est.stage}.launcher=accelerate with distributed.deepspeed={offload}")
    return "set " + ", or ".join(options) if options else "use a smaller backbone or a machine with more memory"


def _value(cfg: PipelineConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _size(n: float) -> str:
    return f"{n / MiB:,.0f} MiB" if n < GiB else f"{n / GiB:,.1f} GiB"


def plan_json(plan: MemoryPlan) -> dict[str, Any]:
    """Machine-readable plan; every size in bytes, per rank unless it says ``host_total``."""
    stages = {}
    for est in plan.estimates:
        stages[est.stage] = {
            "device": est.device,
            "peak_phase": est.peak_phase,
            "ranks": est.ranks,
            **{c: getattr(est, c) for c in COLUMNS},
            "total": est.total,
            "host": est.host,
            "launcher": est.launcher,
            "host_total": est.host_total,
            "available": plan.available(est),
            "fits": plan.fits(est),
        }
    return {"available_host": plan.available_host, "available_gpu": plan.available_gpu, "stages": stages}


def format_plan(plan: MemoryPlan) -> str:
    """A row per stage: the components of one rank's peak and its total on the stage's device, this
    machine's host RAM over its ranks, what is available, and the verdict."""
    header = (
        "stage",
        "device",
        "peak at",
        "weights",
        "adapters+optim",
        "activations",
        "logits",
        "kv cache",
        "overhead",
        "total/rank",
        "ranks",
        "host RAM",
        "available",
        "verdict",
    )
    rows: list[tuple[str, ...]] = [header]
    for est in plan.estimates:
        fits, free = plan.fits(est), plan.available(est)
        verdict = "OK" if fits else ("unknown" if fits is None else "TOO BIG")
        rows.append(
            (
                est.stage,
                "GPU" if est.device == "cuda" else "CPU",
                est.peak_phase,
                *(_size(getattr(est, c)) for c in COLUMNS),
                _size(est.total),
                str(est.ranks),
                _size(est.host_total),
                _size(free) if free is not None else "unknown",
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.append(
        "total/rank: peak on the stage's device (CPU: host RAM; GPU: its memory, the process itself in host "
        "RAM); host RAM: this machine's ranks together. An estimate: see docs/architecture.md, Memory plan."
    )
    return "\n".join(lines)
