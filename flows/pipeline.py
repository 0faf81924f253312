"""The pipeline flow: the configured stages in order, each a Prefect task that reuses or runs it.

Only paths and small dicts cross between tasks, never models: Prefect cannot hash tensors, and the
stage processes own all the heavy state. Prefect's own result caching is off (``NO_CACHE``): our cache
key (``stages.provenance``) covers what Prefect cannot see, such as the backbone and dataset digests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed, State

from flows.run_dir import CONFIG
from flows.stage_task import StageFailed, run_or_reuse
from stages.runner import USER_ERRORS
from stages.config import load_config
from stages.provenance import stage_inputs


@task(cache_policy=NO_CACHE, task_run_name="{stage}")
def stage_task(stage: str, run_dir: str, inputs: dict[str, str], force: bool = False) -> dict[str, Any] | State:
    try:
        return run_or_reuse(stage, Path(run_dir), {k: Path(v) for k, v in inputs.items()}, force=force)
    except (StageFailed, *USER_ERRORS) as err:
        # An expected failure with its own clear message: fail the task without a Prefect traceback.
        return Failed(message=str(err))


@flow(name="rlhf-pipeline", flow_run_name="{run_dir}")
def pipeline(run_dir: str, force: list[str] | None = None) -> dict[str, dict[str, Any]] | State:
    """Run every configured stage of the run in ``run_dir``; return each stage's result."""
    cfg = load_config(Path(run_dir) / CONFIG)
    forced = set(force or [])
    results: dict[str, dict[str, Any]] = {}
    for stage in cfg.run.stages:
        inputs = {name: str(Path(run_dir) / name) for name in stage_inputs(stage, cfg)}
        if stage in forced:
            forced.update(cfg.run.stages)  # a forced rerun recomputes everything downstream of it
        state = stage_task(stage, run_dir, inputs, force=stage in forced, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        results[stage] = state.result()
    return results
