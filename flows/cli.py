"""The ``rlhf`` command. Only argparse is imported at start-up; each command imports what it needs,
so ``rlhf --help`` is instant and ``rlhf report`` never loads torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from stages.io.config import PipelineConfig

DEFAULT_RUNS_DIR = Path("runs")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config on top of the embedded default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one key, e.g. --set sft.max_steps=20 (repeatable)")


def _add_skip_memory_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="run even if a stage's estimated peak memory exceeds what is available (see rlhf plan)")


def build_parser() -> argparse.ArgumentParser:
    from stages.registry import STAGE_ORDER  # pure data: --help stays fast

    parser = argparse.ArgumentParser(prog="rlhf", description="SFT -> reward model -> PPO/RRHF on one frozen backbone.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline (stages already computed are reused from the cache)")
    _add_config_args(run)
    run.add_argument("--run-id", help="name of the run folder (default: a timestamp)")
    run.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where run folders go (default: runs/)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="recompute STAGE (and everything after it) even if cached")
    _add_skip_memory_check(run)
    run.set_defaults(handler=_cmd_run)

    report = commands.add_parser("report", help="show a run's stages, metrics and artifacts")
    report.add_argument("run_id")
    report.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    report.add_argument("--json", action="store_true", help="print machine-readable JSON")
    report.set_defaults(handler=_cmd_report)

    stage = commands.add_parser("stage", help="rerun one stage of a run from its upstream artifacts, then what follows")
    stage.add_argument("name", choices=STAGE_ORDER)
    stage.add_argument("--run", dest="run_id", required=True, help="the run whose artifacts and config to use")
    stage.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    stage.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="change the run's config first (the previous config is kept as config.<n>.yaml)")
    stage.add_argument("--force", action="store_true", help="recompute the stage even if its cache key is unchanged")
    _add_skip_memory_check(stage)
    stage.set_defaults(handler=_cmd_stage)

    serve = commands.add_parser("serve", help="serve the pipeline as a Prefect deployment on a cron schedule")
    _add_config_args(serve)
    serve.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" (nightly at 03:00)')
    serve.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    serve.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    serve.set_defaults(handler=_cmd_serve)

    plan = commands.add_parser("plan", help="estimate each stage's peak memory and compare it with what is available")
    _add_config_args(plan)
    plan.add_argument("--json", action="store_true", help="print machine-readable JSON (sizes in bytes)")
    plan.set_defaults(handler=_cmd_plan)

    inspect = commands.add_parser("inspect", help="show the ids each stage trains on for one row of each dataset: "
                                  "token boundaries, where the loss applies, where generation stops")
    _add_config_args(inspect)
    inspect.add_argument("--row", type=_row_number, default=1, help="the record to show, from 1 (default: the first)")
    inspect.set_defaults(handler=_cmd_inspect)

    resume = commands.add_parser("resume", help="finish a killed or failed run: finished stages are kept, "
                                                "an interrupted one resumes from its last checkpoint")
    resume.add_argument("run_id")
    resume.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    _add_skip_memory_check(resume)
    resume.set_defaults(handler=_cmd_resume)

    runs = commands.add_parser("runs", help="list runs: id, status, promotion, stages, start time, duration")
    runs.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    runs.add_argument("--promoted", action="store_true", help="only promoted runs, with who or what promoted them")
    runs.set_defaults(handler=_cmd_runs)

    promote = commands.add_parser("promote", help="promote a finished run by hand (a recorded human approval)")
    promote.add_argument("run_id")
    promote.add_argument("--by", help="who approves (default: the current user)")
    promote.add_argument("--reason", help="why, kept with the approval")
    promote.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    promote.set_defaults(handler=_cmd_promote)

    sweep = commands.add_parser("sweep", help="search settings over whole runs with Optuna; unchanged upstream "
                                              "stages come from the cache")
    _add_config_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY.PATH=[V1,V2,...]", required=True,
                       help="values to search for one key, e.g. --grid ppo.learning_rate=[1e-4,5e-4] (repeatable)")
    sweep.add_argument("--metric", required=True, help="STAGE.METRIC to optimise, e.g. ppo.task_score")
    sweep.add_argument("--direction", choices=("max", "min"), default="max")
    sweep.add_argument("--sampler", choices=("grid", "random", "tpe"), default="grid")
    sweep.add_argument("--trials", type=int, help="trials to run (default for grid: every combination)")
    sweep.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    sweep.add_argument("--name", help="the study's name (default: derived from the command, so rerunning it resumes)")
    sweep.add_argument("--storage", help="Optuna storage URL (default: sqlite under $RLHF_HOME/sweeps.db)")
    sweep.add_argument("--db-wait", type=float, metavar="SECONDS",  # default: flows.sweep.DB_WAIT_S, read lazily
                       help="how long to wait for another process's lock on a SQLite study before stopping "
                            "(default 120)")
    sweep.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    _add_skip_memory_check(sweep)
    sweep.set_defaults(handler=_cmd_sweep)

    export = commands.add_parser("export", help="export a run's adapter, or merge it into a standalone model")
    export.add_argument("run_id")
    export.add_argument("--stage", choices=STAGE_ORDER, help="which stage's artifact (default: the run's last stage)")
    export.add_argument("--out", type=Path, required=True, help="a new folder to write the export to")
    export.add_argument("--merge", action="store_true",
                        help="merge the adapter into a copy of the base: a plain transformers model (the reward "
                             "model as sequence classification); P-tuning v2 cannot be merged")
    export.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    export.set_defaults(handler=_cmd_export)

    build = commands.add_parser("build-backbone", help="build (or find) the built-in backbone; print its folder")
    build.set_defaults(handler=_cmd_build_backbone)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from flows.run_dir import new_run_id, prepare_run_dir
    from stages.io.config import load_config

    server_ready = _boot_prefect()
    cfg = load_config(args.config, args.overrides)
    _preflight(cfg, memory_stages=None if args.skip_memory_check else cfg.run.stages)
    run_id = args.run_id or new_run_id()
    run_dir = prepare_run_dir(args.runs_dir, run_id, cfg).resolve()
    unknown = sorted(set(args.force) - set(cfg.run.stages))
    if unknown:
        raise _usage_error(f"--force {unknown}: not among this run's stages {cfg.run.stages}")
    return _run_flow(run_dir, cfg.run.stages, args.force, args.runs_dir, server_ready)


def _cmd_stage(args: argparse.Namespace) -> int:
    from flows.run_dir import CONFIG, update_run_config
    from stages.io.config import load_config

    server_ready = _boot_prefect()
    run_dir = (args.runs_dir / args.run_id).resolve()
    if not (run_dir / CONFIG).is_file():
        raise _usage_error(f"{run_dir}: no such run (see `rlhf runs`)")
    cfg = load_config(run_dir / CONFIG, args.overrides)
    if args.name not in cfg.run.stages:
        raise _usage_error(f"stage {args.name} is not in run {args.run_id}'s stages {cfg.run.stages}")
    rerun = cfg.run.stages[cfg.run.stages.index(args.name):]  # the stage and everything after it
    _preflight(cfg, memory_stages=None if args.skip_memory_check else rerun)
    update_run_config(run_dir, cfg)
    return _run_flow(run_dir, cfg.run.stages, [args.name] if args.force else [], args.runs_dir, server_ready)


def _cmd_resume(args: argparse.Namespace) -> int:
    """The same as ``rlhf run --run-id ID`` with the run's own config: every stage is looked up by its key."""
    from flows.run_dir import CONFIG
    from stages.io.config import load_config

    server_ready = _boot_prefect()
    run_dir = (args.runs_dir / args.run_id).resolve()
    if not (run_dir / CONFIG).is_file():
        raise _usage_error(f"{run_dir}: no such run (see `rlhf runs`)")
    cfg = load_config(run_dir / CONFIG)
    _preflight(cfg, memory_stages=None if args.skip_memory_check else cfg.run.stages)
    return _run_flow(run_dir, cfg.run.stages, [], args.runs_dir, server_ready)


def _boot_prefect() -> Callable[[], None]:
    from flows.prefect_env import configure_prefect, start_server_early

    configure_prefect()
    return start_server_early()


def _preflight(cfg: PipelineConfig, memory_stages: list[str] | None = None) -> None:
    from flows.preflight import preflight

    preflight(cfg, memory_stages)


def _run_flow(run_dir: Path, stages: list[str], force: list[str], runs_dir: Path,
              server_ready: Callable[[], None]) -> int:
    from filelock import FileLock, Timeout

    from flows.pipeline import pipeline
    from flows.report import format_report, run_report

    lock = FileLock(str(run_dir / ".running.lock"))
    try:
        lock.acquire(timeout=0)  # released by the OS if this process dies, so a killed run can be rerun
    except Timeout:
        raise _usage_error(f"run {run_dir.name} is already running in another process; "
                           "wait for it or choose another --run-id") from None
    print(f"run {run_dir.name}: stages {stages} -> {run_dir}", flush=True)
    server_ready()
    try:
        state = pipeline(str(run_dir), force=force, return_state=True)
    finally:
        lock.release()
        report = run_report(run_dir)
        print("\n" + format_report(report))
    print(f"\nresults: {run_dir}")
    if any(entry["status"] != "cached" for entry in report["stages"].values()):
        from flows.report_html import write_report_html

        print(f"report:  {write_report_html(report, run_dir)}")
    else:  # nothing new was trained: keep the all-cached path fast, render on demand
        print(f"report:  every stage came from the cache; `rlhf report {run_dir.name} --runs-dir {runs_dir}` renders it")
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from stages.io.config import load_config

    cfg = load_config(args.config, args.overrides)  # fail now on a bad config, not at 03:00
    _preflight(cfg)
    if not os.environ.get("PREFECT_API_URL"):
        raise _usage_error("rlhf serve needs a Prefect server: run `prefect server start` and export "
                           "PREFECT_API_URL=http://127.0.0.1:4200/api (see README, Schedules)")
    from flows.pipeline import scheduled_run
    from flows.stage_task import ACCELERATOR_TAG

    _limit_concurrency(ACCELERATOR_TAG, 1)
    parameters = {"config": str(args.config.resolve()) if args.config else None, "overrides": args.overrides,
                  "runs_dir": str(args.runs_dir.resolve())}
    print(f"serving deployment rlhf-scheduled/{args.name} on cron {args.cron!r}; trigger now with "
          f"`prefect deployment run rlhf-scheduled/{args.name}`", flush=True)
    scheduled_run.serve(name=args.name, cron=args.cron, parameters=parameters)
    return 0


def _limit_concurrency(tag: str, limit: int) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=limit)


def _cmd_report(args: argparse.Namespace) -> int:
    from flows.report import format_report, run_report

    report = run_report(args.runs_dir / args.run_id)
    if args.json:
        from stages.io.artifacts import strict_json

        print(json.dumps(strict_json(report), indent=2, allow_nan=False))
        return 0
    from flows.report_html import write_report_html

    print(format_report(report))
    print(f"report: {write_report_html(report, args.runs_dir / args.run_id)}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from flows.memory_check import format_plan, plan_json, plan_memory
    from flows.preflight import budget_lines, build_backbone, start_check
    from stages.io.config import load_config

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


def _row_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a record number, from 1")
    return int(text)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from flows.preflight import ConfigProcess, build_backbone
    from stages.io.config import load_config

    cfg = load_config(args.config, args.overrides)
    build_backbone(cfg.backbone)
    with ConfigProcess("stages.tools.explain", cfg, "--row", str(args.row), capture=False) as explaining:
        return explaining.wait()[0]


def _cmd_runs(args: argparse.Namespace) -> int:
    from flows.report import list_runs

    if args.promoted:
        from flows.promotion import LATEST, promoted_runs

        promoted = promoted_runs(args.runs_dir)
        print(f"{'run':<28} {'promoted at':<34} by")
        for row in promoted:
            by = f"{row['approved_by']} (by hand)" if row["by"] == "manual" else "its gate"
            print(f"{row['run_id']:<28} {row['at']:<34} {by}")
        print(f"latest: {promoted[-1]['run_id']} ({args.runs_dir / LATEST})" if promoted
              else f"(no promoted runs in {args.runs_dir})")
        return 0
    rows = list_runs(args.runs_dir)
    print(f"{'run':<28} {'status':<10} {'promotion':<13} {'sweep':<22} {'started':<20} {'seconds':>8}  stages")
    for row in rows:
        stages = ",".join(row["stages"])
        sweep = f"{row['sweep']}#{row['trial']}" if row["sweep"] else "-"
        print(f"{row['run_id']:<28} {row['status']:<10} {row['promotion']:<13} {sweep:<22} {row['started']:<20} "
              f"{row['seconds']:>8.1f}  {stages}")
    if not rows:
        print(f"(no runs in {args.runs_dir})")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    import getpass

    from flows.promotion import promote
    from flows.report import describe

    record = promote(args.runs_dir / args.run_id, args.by or getpass.getuser(), args.reason)
    print(f"run {args.run_id}: {describe(record)}")
    if record["gate"] and record["gate"]["status"] != "promoted":
        print(f"  over its gate: {describe(record['gate'])}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from flows.sweep import DB_WAIT_S, StudyLocked, SweepSpec, check_spec, format_leaderboard, parse_grid, run_sweep
    from stages.io.config import load_config

    server_ready = _boot_prefect()
    spec = SweepSpec(config=args.config, overrides=tuple(args.overrides), grid=parse_grid(args.grid),
                     metric=args.metric, direction="maximize" if args.direction == "max" else "minimize",
                     sampler=args.sampler, trials=args.trials, seed=args.seed)
    check_spec(spec)  # every trial's config loads, and the metric's stage runs, before anything trains
    cfg = load_config(args.config, args.overrides)
    _preflight(cfg, memory_stages=None if args.skip_memory_check else cfg.run.stages)
    server_ready()
    try:
        board = run_sweep(spec, args.runs_dir, storage=args.storage, name=args.name,
                          wait_s=DB_WAIT_S if args.db_wait is None else args.db_wait)
    except StudyLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + format_leaderboard(board))
    print(f"report: {board['report']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from flows.preflight import ConfigProcess
    from flows.run_dir import CONFIG
    from stages.io.config import load_config

    run_dir = args.runs_dir / args.run_id
    if not (run_dir / CONFIG).is_file():
        raise _usage_error(f"{run_dir}: no such run (see `rlhf runs`)")
    options = [*(["--stage", args.stage] if args.stage else []), *(["--merge"] if args.merge else [])]
    with ConfigProcess("stages.tools.export", load_config(run_dir / CONFIG), str(run_dir), "--out", str(args.out),
                       *options, capture=False) as exporting:  # torch and the model load in their own process
        return exporting.wait()[0]


def _cmd_build_backbone(args: argparse.Namespace) -> int:
    import subprocess

    return subprocess.run([sys.executable, "-m", "stages.model.builtin_backbone"]).returncode


def _usage_error(message: str) -> Exception:
    from stages.io.config import ConfigError

    return ConfigError(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.launch import USER_ERRORS, StageFailed

    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
