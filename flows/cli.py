"""The ``rlhf`` command. Only argparse is imported at start-up; each command imports what it needs,
so ``rlhf --help`` is instant and ``rlhf report`` never loads torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_RUNS_DIR = Path("runs")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config on top of the embedded default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one key, e.g. --set sft.max_steps=20 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="SFT -> reward model -> PPO/RRHF on one frozen backbone.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline (stages already computed are reused from the cache)")
    _add_config_args(run)
    run.add_argument("--run-id", help="name of the run folder (default: a timestamp)")
    run.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where run folders go (default: runs/)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="recompute STAGE (and everything after it) even if cached")
    run.set_defaults(handler=_cmd_run)

    report = commands.add_parser("report", help="show a run's stages, metrics and artifacts")
    report.add_argument("run_id")
    report.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    report.add_argument("--json", action="store_true", help="print machine-readable JSON")
    report.set_defaults(handler=_cmd_report)

    build = commands.add_parser("build-backbone", help="build (or find) the built-in tiny backbone and print its folder")
    build.set_defaults(handler=_cmd_build_backbone)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from flows.prefect_env import configure_prefect
    from flows.report import format_report, run_report
    from flows.run_dir import new_run_id, prepare_run_dir
    from stages.config import load_config
    from stages.backbone import resolve_backbone
    from stages.provenance import check_datasets

    cfg = load_config(args.config, args.overrides)
    check_datasets(cfg)  # bad data fails here, in one line, before any run folder or process exists
    resolve_backbone(cfg.backbone)  # a first-use build happens now, not inside the flow's server process
    run_id = args.run_id or new_run_id()
    run_dir = prepare_run_dir(args.runs_dir, run_id, cfg).resolve()
    unknown = sorted(set(args.force) - set(cfg.run.stages))
    if unknown:
        raise _usage_error(f"--force {unknown}: not among this run's stages {cfg.run.stages}")
    configure_prefect()
    from flows.pipeline import pipeline

    print(f"run {run_id}: stages {cfg.run.stages} -> {run_dir}", flush=True)
    try:
        state = pipeline(str(run_dir), force=args.force, return_state=True)
    finally:
        print("\n" + format_report(run_report(run_dir)))
    print(f"\nresults: {run_dir}   (rlhf report {run_id} --runs-dir {args.runs_dir} --json)")
    if state.is_failed():
        print(f"error: {state.message}", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from flows.report import format_report, run_report

    report = run_report(args.runs_dir / args.run_id)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_build_backbone(args: argparse.Namespace) -> int:
    from stages.builtin_backbone import ensure_builtin_backbone

    print(ensure_builtin_backbone())
    return 0


def _usage_error(message: str) -> Exception:
    from stages.config import ConfigError

    return ConfigError(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.stage_task import StageFailed
    from stages.runner import USER_ERRORS

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
