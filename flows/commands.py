"""What each ``rlhf`` command does (``flows.cli`` parses the command line and calls one of these).

Each returns the process's exit status. Prefect, Optuna and matplotlib load only in the commands that
use them (inside those functions), so ``rlhf report`` and ``rlhf plan`` stay quick; nothing here
imports torch: the stages, the contract check, ``rlhf inspect`` and ``rlhf export`` run in processes
of their own.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from filelock import Timeout

from flows.liveness import reconcile, reconcile_all, sync_prefect_all
from flows.memory_check import format_plan, plan_json, plan_memory
from flows.prefect_env import configure_prefect, start_server_early
from flows.preflight import ConfigProcess, budget_lines, build_backbone, preflight, start_check
from flows.promotion import LATEST, promote, promoted_runs
from flows.report import describe, format_report, list_runs, run_report
from flows.report_html import write_report_html
from flows.run_dir import new_run_id, prepare_run_dir, read_config, run_lock, update_run_config
from flows.sweep import DB_WAIT_S, StudyLocked, SweepSpec, check_spec, format_leaderboard, parse_grid, run_sweep
from stages.io.artifacts import strict_json
from stages.io.config import ConfigError, load_config

LOCK_WAIT_S = 2.0


def run_command(args: argparse.Namespace) -> int:
    server_ready = _boot_prefect()
    cfg = load_config(args.config, args.overrides)
    preflight(cfg, memory_stages=None if args.skip_memory_check else cfg.run.stages)
    run_id = args.run_id or new_run_id()
    run_dir = prepare_run_dir(args.runs_dir, run_id, cfg).resolve()
    unknown = sorted(set(args.force) - set(cfg.run.stages))
    if unknown:
        raise ConfigError(f"--force {unknown}: not among this run's stages {cfg.run.stages}")
    return _run_flow(run_dir, cfg.run.stages, args.force, args.runs_dir, server_ready)


def stage_command(args: argparse.Namespace) -> int:
    server_ready = _boot_prefect()
    run_dir = (args.runs_dir / args.run_id).resolve()
    cfg = read_config(run_dir, args.overrides)
    if args.name not in cfg.run.stages:
        raise ConfigError(f"stage {args.name} is not in run {args.run_id}'s stages {cfg.run.stages}")
    rerun = cfg.run.stages[cfg.run.stages.index(args.name) :]  # the stage and everything after it
    preflight(cfg, memory_stages=None if args.skip_memory_check else rerun)
    update_run_config(run_dir, cfg)
    return _run_flow(run_dir, cfg.run.stages, [args.name] if args.force else [], args.runs_dir, server_ready)


def resume_command(args: argparse.Namespace) -> int:
    """The same as ``rlhf run --run-id ID`` with the run's own config: every stage is looked up by its key."""
    server_ready = _boot_prefect()
    run_dir = (args.runs_dir / args.run_id).resolve()
    cfg = read_config(run_dir)
    preflight(cfg, memory_stages=None if args.skip_memory_check else cfg.run.stages)
    return _run_flow(run_dir, cfg.run.stages, [], args.runs_dir, server_ready)


def _boot_prefect() -> Callable[[], None]:
    configure_prefect()
    return start_server_early()


def _run_flow(
    run_dir: Path, stages: list[str], force: list[str], runs_dir: Path, server_ready: Callable[[], None]
) -> int:
    from flows.pipeline import pipeline

    reconcile(run_dir, tell_prefect=False)  # a stage left running by a killed process is crashed; Prefect is
    # told once its server answers, by the flow (``record_flow_run``) and for the other runs below
    lock = run_lock(run_dir)
    try:
        # Released by the OS if this process dies, so a killed run can be rerun. A second: `rlhf runs` in
        # another process holds it for a moment to tell whether the run lives.
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise ConfigError(
            f"run {run_dir.name} is already running in another process; wait for it or choose another --run-id"
        ) from None
    print(f"run {run_dir.name}: stages {stages} -> {run_dir}", flush=True)
    server_ready()
    sync_prefect_all(runs_dir)  # crashes found by commands that had no Prefect server at hand
    try:
        state = pipeline(str(run_dir), force=force, return_state=True)
    finally:
        lock.release()
        report = run_report(run_dir)
        print("\n" + format_report(report))
    print(f"\nresults: {run_dir}")
    if any(entry["status"] != "cached" for entry in report["stages"].values()):
        print(f"report:  {write_report_html(report, run_dir)}")
    else:  # nothing new was trained: keep the all-cached path fast, render on demand
        print(
            f"report:  every stage came from the cache; `rlhf report {run_dir.name} --runs-dir {runs_dir}` renders it"
        )
    from flows.dashboard import rebuild_dashboard

    print(f"runs:    {rebuild_dashboard(runs_dir)}")
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    return 0


def serve_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # fail now on a bad config, not at 03:00
    preflight(cfg)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "rlhf serve needs a Prefect server: run `prefect server start` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (see README, Schedules)"
        )
    from flows.pipeline import scheduled_run
    from flows.stage_task import ACCELERATOR_TAG

    _limit_concurrency(ACCELERATOR_TAG, 1)
    parameters = {
        "config": str(args.config.resolve()) if args.config else None,
        "overrides": args.overrides,
        "runs_dir": str(args.runs_dir.resolve()),
    }
    print(
        f"serving deployment rlhf-scheduled/{args.name} on cron {args.cron!r}; trigger now with "
        f"`prefect deployment run rlhf-scheduled/{args.name}`",
        flush=True,
    )
    scheduled_run.serve(name=args.name, cron=args.cron, parameters=parameters)
    return 0


def _limit_concurrency(tag: str, limit: int) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=limit)


def report_command(args: argparse.Namespace) -> int:
    reconcile(args.runs_dir / args.run_id)
    report = run_report(args.runs_dir / args.run_id)
    if args.json:
        print(json.dumps(strict_json(report), indent=2, allow_nan=False))
        return 0
    print(format_report(report))
    print(f"report: {write_report_html(report, args.runs_dir / args.run_id)}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    build_backbone(cfg.backbone)
    with start_check(cfg) as check:
        plan = plan_memory(cfg)
        counts = budget_lines(check)
    if args.json:
        print(json.dumps({**plan_json(plan), "budgets": counts}, indent=2))
    else:
        print(format_plan(plan))
        print("\nrows the token budgets cut or drop (the exact ids each stage trains on):")
        print("\n".join(f"  {count['line']}" for count in counts))
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    build_backbone(cfg.backbone)
    with ConfigProcess("stages.tools.explain", cfg, "--row", str(args.row), capture=False) as explaining:
        return explaining.wait()[0]


def runs_command(args: argparse.Namespace) -> int:
    if args.promoted:
        promoted = promoted_runs(args.runs_dir)
        print(f"{'run':<28} {'promoted at':<34} by")
        for row in promoted:
            by = f"{row['approved_by']} (by hand)" if row["by"] == "manual" else "its gate"
            print(f"{row['run_id']:<28} {row['at']:<34} {by}")
        print(
            f"latest: {promoted[-1]['run_id']} ({args.runs_dir / LATEST})"
            if promoted
            else f"(no promoted runs in {args.runs_dir})"
        )
        return 0
    reconcile_all(args.runs_dir)  # a run whose process died shows crashed, not running
    rows = list_runs(args.runs_dir)
    print(f"{'run':<28} {'status':<10} {'promotion':<13} {'sweep':<22} {'started':<20} {'seconds':>8}  stages")
    for row in rows:
        stages = ",".join(row["stages"])
        sweep = f"{row['sweep']}#{row['trial']}" if row["sweep"] else "-"
        print(
            f"{row['run_id']:<28} {row['status']:<10} {row['promotion']:<13} {sweep:<22} {row['started']:<20} "
            f"{row['seconds']:>8.1f}  {stages}"
        )
    if not rows:
        print(f"(no runs in {args.runs_dir})")
    return 0


def dashboard_command(args: argparse.Namespace) -> int:
    from flows.dashboard import write_dashboard

    reconcile_all(args.runs_dir)  # a run whose process died shows crashed, not running
    print(f"dashboard: {write_dashboard(args.runs_dir)}")
    return 0


def diff_command(args: argparse.Namespace) -> int:
    from flows.compare import compare, format_diff, run_summary

    summaries = []
    for run_id in (args.run_a, args.run_b):
        run_dir = args.runs_dir / run_id
        read_config(run_dir)  # ConfigError naming a folder that is no run
        reconcile(run_dir)
        summaries.append(run_summary(run_dir))
    diff = compare(*summaries)
    print(json.dumps(strict_json(diff), indent=2, allow_nan=False) if args.json else format_diff(diff))
    return 0


def promote_command(args: argparse.Namespace) -> int:
    record = promote(args.runs_dir / args.run_id, args.by or getpass.getuser(), args.reason)
    print(f"run {args.run_id}: {describe(record)}")
    if record["gate"] and record["gate"]["status"] != "promoted":
        print(f"  over its gate: {describe(record['gate'])}")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    server_ready = _boot_prefect()
    spec = SweepSpec(
        config=args.config,
        overrides=tuple(args.overrides),
        grid=parse_grid(args.grid),
        metric=args.metric,
        direction="maximize" if args.direction == "max" else "minimize",
        sampler=args.sampler,
        trials=args.trials,
        seed=args.seed,
    )
    check_spec(spec)  # every trial's config loads, and the metric's stage runs, before anything trains
    cfg = load_config(args.config, args.overrides)
    preflight(cfg, memory_stages=None if args.skip_memory_check else cfg.run.stages)
    server_ready()
    try:
        board = run_sweep(
            spec,
            args.runs_dir,
            storage=args.storage,
            name=args.name,
            wait_s=DB_WAIT_S if args.db_wait is None else args.db_wait,
        )
    except StudyLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + format_leaderboard(board))
    print(f"report: {board['report']}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    run_dir = args.runs_dir / args.run_id
    options = [*(["--stage", args.stage] if args.stage else []), *(["--merge"] if args.merge else [])]
    with ConfigProcess(
        "stages.tools.export", read_config(run_dir), str(run_dir), "--out", str(args.out), *options, capture=False
    ) as exporting:  # torch and the model load in their own process
        return exporting.wait()[0]


def build_backbone_command(args: argparse.Namespace) -> int:
    return subprocess.run([sys.executable, "-m", "stages.model.builtin_backbone"]).returncode
