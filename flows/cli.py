"""The ``rlhf`` command. Only argparse is imported at start-up; each command imports what it needs,
so ``rlhf --help`` is instant and ``rlhf report`` never loads torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

DEFAULT_RUNS_DIR = Path("runs")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config on top of the embedded default")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one key, e.g. --set sft.max_steps=20 (repeatable)",
    )


def _add_skip_memory_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="run even if a stage's estimated peak memory exceeds what is available (see rlhf plan)",
    )


def build_parser() -> argparse.ArgumentParser:
    from stages.registry import STAGE_ORDER  # pure data: --help stays fast

    parser = argparse.ArgumentParser(prog="rlhf", description="SFT -> reward model -> PPO/RRHF on one frozen backbone.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline (stages already computed are reused from the cache)")
    _add_config_args(run)
    run.add_argument("--run-id", help="name of the run folder (default: a timestamp)")
    run.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where run folders go (default: runs/)")
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="recompute STAGE (and everything after it) even if cached",
    )
    _add_skip_memory_check(run)
    run.set_defaults(handler="run_command")

    report = commands.add_parser("report", help="show a run's stages, metrics and artifacts")
    report.add_argument("run_id")
    report.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    report.add_argument("--json", action="store_true", help="print machine-readable JSON")
    report.set_defaults(handler="report_command")

    stage = commands.add_parser("stage", help="rerun one stage of a run from its upstream artifacts, then what follows")
    stage.add_argument("name", choices=STAGE_ORDER)
    stage.add_argument("--run", dest="run_id", required=True, help="the run whose artifacts and config to use")
    stage.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    stage.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="change the run's config first (the previous config is kept as config.<n>.yaml)",
    )
    stage.add_argument("--force", action="store_true", help="recompute the stage even if its cache key is unchanged")
    _add_skip_memory_check(stage)
    stage.set_defaults(handler="stage_command")

    serve = commands.add_parser("serve", help="serve the pipeline as a Prefect deployment on a cron schedule")
    _add_config_args(serve)
    serve.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" (nightly at 03:00)')
    serve.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    serve.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    serve.set_defaults(handler="serve_command")

    plan = commands.add_parser("plan", help="estimate each stage's peak memory and compare it with what is available")
    _add_config_args(plan)
    plan.add_argument("--json", action="store_true", help="print machine-readable JSON (sizes in bytes)")
    plan.set_defaults(handler="plan_command")

    inspect = commands.add_parser(
        "inspect",
        help="show the ids each stage trains on for one row of each dataset: "
        "token boundaries, where the loss applies, where generation stops",
    )
    _add_config_args(inspect)
    inspect.add_argument("--row", type=_row_number, default=1, help="the record to show, from 1 (default: the first)")
    inspect.set_defaults(handler="inspect_command")

    resume = commands.add_parser(
        "resume",
        help="finish a killed or failed run: finished stages are kept, "
        "an interrupted one resumes from its last checkpoint",
    )
    resume.add_argument("run_id")
    resume.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    _add_skip_memory_check(resume)
    resume.set_defaults(handler="resume_command")

    runs = commands.add_parser("runs", help="list runs: id, status, promotion, stages, start time, duration")
    runs.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    runs.add_argument("--promoted", action="store_true", help="only promoted runs, with who or what promoted them")
    runs.set_defaults(handler="runs_command")

    dashboard = commands.add_parser(
        "dashboard",
        help="write <runs-dir>/dashboard.html: key metrics of every run over time, the champion, a run picker",
    )
    dashboard.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    dashboard.set_defaults(handler="dashboard_command")

    diff = commands.add_parser(
        "diff", help="compare two runs: metrics, config, data and backbone digests, final samples"
    )
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    diff.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    diff.add_argument("--json", action="store_true", help="print machine-readable JSON")
    diff.set_defaults(handler="diff_command")

    promote = commands.add_parser("promote", help="promote a finished run by hand (a recorded human approval)")
    promote.add_argument("run_id")
    promote.add_argument("--by", help="who approves (default: the current user)")
    promote.add_argument("--reason", help="why, kept with the approval")
    promote.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    promote.set_defaults(handler="promote_command")

    sweep = commands.add_parser(
        "sweep", help="search settings over whole runs with Optuna; unchanged upstream stages come from the cache"
    )
    _add_config_args(sweep)
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY.PATH=[V1,V2,...]",
        required=True,
        help="values to search for one key, e.g. --grid ppo.learning_rate=[1e-4,5e-4] (repeatable)",
    )
    sweep.add_argument("--metric", required=True, help="STAGE.METRIC to optimise, e.g. ppo.task_score")
    sweep.add_argument("--direction", choices=("max", "min"), default="max")
    sweep.add_argument("--sampler", choices=("grid", "random", "tpe"), default="grid")
    sweep.add_argument("--trials", type=int, help="trials to run (default for grid: every combination)")
    sweep.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    sweep.add_argument("--name", help="the study's name (default: derived from the command, so rerunning it resumes)")
    sweep.add_argument("--storage", help="Optuna storage URL (default: sqlite under $RLHF_HOME/sweeps.db)")
    sweep.add_argument(
        "--db-wait",
        type=float,
        metavar="SECONDS",  # default: flows.sweep.DB_WAIT_S, read lazily
        help="how long to wait for another process's lock on a SQLite study before stopping (default 120)",
    )
    sweep.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    _add_skip_memory_check(sweep)
    sweep.set_defaults(handler="sweep_command")

    export = commands.add_parser("export", help="export a run's adapter, or merge it into a standalone model")
    export.add_argument("run_id")
    export.add_argument("--stage", choices=STAGE_ORDER, help="which stage's artifact (default: the run's last stage)")
    export.add_argument("--out", type=Path, required=True, help="a new folder to write the export to")
    export.add_argument(
        "--merge",
        action="store_true",
        help="merge the adapter into a copy of the base: a plain transformers model (the reward "
        "model as sequence classification); P-tuning v2 cannot be merged",
    )
    export.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    export.set_defaults(handler="export_command")

    build = commands.add_parser("build-backbone", help="build (or find) the built-in backbone; print its folder")
    build.set_defaults(handler="build_backbone_command")
    return parser


def _row_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a record number, from 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows import commands  # after parsing: --help stays instant
    from flows.launch import USER_ERRORS, StageFailed

    try:
        return getattr(commands, args.handler)(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
