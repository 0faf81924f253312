"""The pipeline flow: the configured stages in order, each a Prefect task that reuses or runs it.

Only paths and small dicts cross between tasks, never models: Prefect cannot hash tensors, and the
stage processes own all the heavy state. Prefect's own result caching is off (``NO_CACHE``): our cache
key (``stages.io.provenance``) covers what Prefect cannot see, such as the backbone and dataset digests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from prefect import flow
from prefect.states import Failed, State

from flows.dashboard import rebuild_dashboard
from flows.liveness import record_flow_run
from flows.promotion import apply_gate, refresh_latest
from flows.report import describe, run_report
from flows.report_html import write_report_html
from flows.run_dir import new_run_id, prepare_run_dir, read_config, run_lock
from flows.stage_task import stage_task
from stages.io.config import load_config
from stages.io.provenance import stage_inputs


def _run_id() -> str:
    """The flow run's name in Prefect's UI: the run id (the run folder's name), not its whole path."""
    from prefect.runtime import flow_run

    return Path(flow_run.parameters["run_dir"]).name


@flow(name="rlhf-pipeline", flow_run_name=_run_id)
def pipeline(run_dir: str, force: list[str] | None = None) -> dict[str, dict[str, Any]] | State:
    """Run every configured stage of the run in ``run_dir``; return each stage's result."""
    from prefect.runtime import flow_run

    record_flow_run(Path(run_dir), str(flow_run.id), flow_run.name)  # and a crashed earlier one names this one
    cfg = read_config(Path(run_dir))
    forced = set(force or [])
    results: dict[str, dict[str, Any]] = {}
    for stage in cfg.run.stages:
        inputs = {name: str(Path(run_dir) / name) for name in stage_inputs(stage, cfg)}
        if stage in forced:
            forced.update(cfg.run.stages)  # a forced rerun recomputes everything downstream of it
        state = stage_task(stage, run_dir, inputs, force=stage in forced, return_state=True)
        if state.is_failed():
            refresh_latest(Path(run_dir).parent)  # a promoted run whose rerun failed is no longer the latest
            return Failed(message=state.message)
        results[stage] = cast(dict[str, Any], state.result())  # a completed task's result: its manifest
    decide_promotion(Path(run_dir), cfg.gate.conditions)
    return results


def decide_promotion(run_dir: Path, conditions: list[str]) -> None:
    """Check a finished run's gate (``flows.promotion``) and show the verdict in Prefect's UI. A failed gate
    is not a failed run: its artifacts stay, it is only marked ``not promoted``."""
    from prefect.artifacts import create_markdown_artifact

    record = apply_gate(run_dir, conditions)
    rows = "".join(
        f"| `{c['condition']}` | {c['value']} | {_champion_cell(c)} | {VERDICTS[c['passed']]} |\n"
        for c in (record or {}).get("conditions", [])
    )
    create_markdown_artifact(
        key="promotion",
        description=f"run {run_dir.name}: {describe(record)}",
        markdown=f"**{describe(record)}**\n\n"
        + (f"| condition | value | champion | |\n|---|---|---|---|\n{rows}" if rows else ""),
    )


VERDICTS = {True: "pass", False: "FAIL", None: "not checked"}  # None: a champion condition with no champion


def _champion_cell(checked: dict[str, Any]) -> str:
    champion = checked.get("champion")
    if champion is None:
        return checked.get("reason", "") if checked["passed"] is None else ""
    return f"{champion['value']} ({champion['run_id']})"


@flow(name="rlhf-scheduled")
def scheduled_run(config: str | None = None, overrides: list[str] | None = None, runs_dir: str = "runs") -> str:
    """What a schedule triggers: a fresh run id, the resolved config written, then the pipeline."""
    cfg = load_config(config, overrides or [])
    run_dir = prepare_run_dir(Path(runs_dir), new_run_id(), cfg).resolve()
    with run_lock(run_dir):  # held while it runs: a run whose process died is told from a live one
        state = pipeline(str(run_dir), return_state=True)
    write_report_html(run_report(run_dir), run_dir)
    print(f"runs: {rebuild_dashboard(Path(runs_dir))}", flush=True)
    if state.is_failed():
        raise RuntimeError(f"run {run_dir.name} failed: {state.message}")
    return str(run_dir)
