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


# Tag-based concurrency limit: `rlhf serve` sets it to 1, so two scheduled runs never train at once.
ACCELERATOR_TAG = "rlhf-accelerator"


@task(cache_policy=NO_CACHE, task_run_name="{stage}", tags=[ACCELERATOR_TAG])
def stage_task(stage: str, run_dir: str, inputs: dict[str, str], force: bool = False) -> dict[str, Any] | State:
    try:
        result = run_or_reuse(stage, Path(run_dir), {k: Path(v) for k, v in inputs.items()}, force=force)
    except (StageFailed, *USER_ERRORS) as err:
        # An expected failure with its own clear message: fail the task without a Prefect traceback.
        return Failed(message=str(err))
    publish_stage_artifacts(stage, Path(run_dir), result)
    return result


def publish_stage_artifacts(stage: str, run_dir: Path, result: dict[str, Any]) -> None:
    """A table of the stage's metrics and a note linking its folder and the run report, in Prefect's UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [{"metric": name, "value": value} for name, value in result["metrics"].items()]
    create_table_artifact(key=f"{stage}-metrics", table=rows, description=f"{stage}: {result['status']}")
    create_markdown_artifact(
        key=f"{stage}-artifact",
        markdown=(f"**{stage}** {result['status']} in {result['seconds']:.1f}s\n\n"
                  f"- artifact: `{result['artifact']}`\n- report: `{run_dir / 'report.html'}`\n"),
        description=f"where the {stage} adapter is",
    )


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


@flow(name="rlhf-scheduled")
def scheduled_run(config: str | None = None, overrides: list[str] | None = None, runs_dir: str = "runs") -> str:
    """What a schedule triggers: a fresh run id, the resolved config written, then the pipeline."""
    from flows.run_dir import new_run_id, prepare_run_dir

    cfg = load_config(config, overrides or [])
    run_dir = prepare_run_dir(Path(runs_dir), new_run_id(), cfg).resolve()
    state = pipeline(str(run_dir), return_state=True)
    if state.is_failed():
        raise RuntimeError(f"run {run_dir.name} failed: {state.message}")
    return str(run_dir)
