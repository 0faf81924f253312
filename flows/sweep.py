"""``rlhf sweep``: a hyper-parameter search over whole pipeline runs, with Optuna, that reuses what the
trials share.

Each trial is a pipeline run (``flows.pipeline.pipeline``, a Prefect subflow of the ``rlhf-sweep`` flow)
of the config with the trial's settings on top. Its stages go through the content-addressed cache like
any run's, so a stage whose cache key the swept settings do not touch (SFT and the reward model in a PPO
sweep) is trained by the first trial and reused by the others.

The study lives in an Optuna storage: SQLite at ``$RLHF_HOME/sweeps.db`` unless ``--storage`` names
another database. A sweep's name is derived from its config, grid, sampler and metric, so running the
same command again continues the same study: finished trials are kept, and a trial the killed process
left running is marked failed and its settings run again first, in the same run folder, so its finished
stages come from the cache and an interrupted stage resumes from its checkpoint.

Samplers: ``grid`` (the default; every combination, Optuna's GridSampler), ``random`` and ``tpe``
(``--trials`` of them, seeded), all over the values listed by ``--grid``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.io import artifacts
from stages.io.config import ConfigError, load_config
from stages.io.paths import rlhf_home

if TYPE_CHECKING:
    import optuna

SWEEPS = "sweeps"  # <runs-dir>/sweeps/<name>/: the sweep's definition, leaderboard and report
TRIAL_FILE = "sweep.json"  # in each trial's run folder: which sweep and trial it belongs to
SAMPLERS = ("grid", "random", "tpe")
INTERRUPTED = "interrupted"  # user attr of a trial a killed process left running (its settings run again)


@dataclass(frozen=True)
class SweepSpec:
    """What to search: the base config, the values of each swept key, how to sample, what to optimise."""

    config: Path | None
    overrides: tuple[str, ...]
    grid: dict[str, list[Any]]
    metric: str  # stage.metric, e.g. ppo.task_score
    direction: str  # maximize | minimize
    sampler: str = "grid"
    trials: int | None = None  # random/tpe: how many; grid: every combination
    seed: int = 0

    @property
    def combinations(self) -> int:
        return len(list(itertools.product(*self.grid.values())))

    @property
    def target(self) -> int:
        return self.combinations if self.sampler == "grid" and self.trials is None else int(self.trials or 0)

    def name(self) -> str:
        """A stable name: the same command continues the same study."""
        base = Path(self.config).read_text() if self.config else ""
        payload = json.dumps([base, self.overrides, self.grid, self.metric, self.direction, self.sampler, self.trials,
                              self.seed], sort_keys=True, default=str)
        return "sweep-" + hashlib.sha256(payload.encode()).hexdigest()[:8]


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``KEY.PATH=[v1,v2]`` (YAML flow lists) into ``{key: values}``; ``ConfigError`` naming a bad one."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        try:
            values = yaml.safe_load(raw) if sep else None
        except yaml.YAMLError:
            values = None
        if not key.strip() or not isinstance(values, list) or not values:
            raise ConfigError(f"--grid {item!r}: expected KEY.PATH=[VALUE,...], e.g. --grid ppo.learning_rate=[1e-4,5e-4]")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        grid[key.strip()] = [_number(v) for v in values]
    if not grid:
        raise ConfigError("rlhf sweep needs at least one --grid KEY.PATH=[VALUE,...]")
    return grid


def _number(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-4`` as a string: a value that reads as a number is one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_spec(spec: SweepSpec) -> None:
    """Refuse, before anything trains, a sweep whose every trial config would not load or whose metric
    names no stage of the run (``ConfigError``)."""
    stage, _, metric = spec.metric.partition(".")
    if not metric:
        raise ConfigError(f"--metric {spec.metric!r}: expected STAGE.METRIC, e.g. ppo.task_score")
    if spec.sampler != "grid" and not spec.trials:
        raise ConfigError(f"--sampler {spec.sampler} needs --trials N")
    for values in itertools.product(*spec.grid.values()):
        cfg = load_config(spec.config, trial_overrides(spec, dict(zip(spec.grid, values, strict=True)), "check"))
        if stage not in cfg.run.stages:
            raise ConfigError(f"--metric {spec.metric}: stage {stage} is not in run.stages {cfg.run.stages}")


def trial_overrides(spec: SweepSpec, params: dict[str, Any], sweep: str) -> list[str]:
    """The base overrides, the trial's settings, and the W&B group of the sweep."""
    return [*spec.overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items()), f"tracking.group={sweep}"]


def trial_run_id(sweep: str, params: dict[str, Any]) -> str:
    """A run id fixed by the trial's settings: a rerun of the same settings finds its run folder (and so its
    checkpoints) again."""
    return f"{sweep}-{hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]}"


def storage_url(storage: str | None) -> str:
    """``--storage`` as given, else SQLite under ``$RLHF_HOME``."""
    return storage or f"sqlite:///{rlhf_home() / 'sweeps.db'}"


def open_study(spec: SweepSpec, sweep: str, storage: str | None) -> "optuna.Study":
    """The sweep's Optuna study (created or continued). Trials a killed process left running are marked
    failed, and their settings queued to run first."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(storage)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    samplers = {"grid": lambda: optuna.samplers.GridSampler(spec.grid, seed=spec.seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=spec.seed),
                "tpe": lambda: optuna.samplers.TPESampler(seed=spec.seed)}
    study = optuna.create_study(study_name=sweep, storage=url, sampler=samplers[spec.sampler](),
                                direction=spec.direction, load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.enqueue_trial(trial.params, skip_if_exists=False)
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return study


def run_sweep(spec: SweepSpec, runs_dir: Path, storage: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Run the sweep's remaining trials as Prefect subflows of one ``rlhf-sweep`` flow run; return its
    leaderboard (``leaderboard``)."""
    from filelock import FileLock, Timeout

    sweep = name or spec.name()
    folder = Path(runs_dir) / SWEEPS / sweep
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".running.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"sweep {sweep} is already running in another process") from None
    try:
        artifacts.write_json(folder / "sweep.json", {
            "name": sweep, "config": str(spec.config) if spec.config else None, "overrides": list(spec.overrides),
            "grid": spec.grid, "metric": spec.metric, "direction": spec.direction, "sampler": spec.sampler,
            "trials": spec.target, "storage": storage_url(storage)})
        sweep_flow(spec, sweep, str(Path(runs_dir).resolve()), storage)
    finally:
        lock.release()
    return leaderboard(spec, sweep, Path(runs_dir), storage)


def _sweep_flow_run_name() -> str:
    from prefect.runtime import flow_run

    return flow_run.parameters["sweep"]


class TrialFailed(RuntimeError):
    """A trial whose pipeline failed or did not report the metric: recorded as failed, the sweep goes on."""


def remaining_trials(study: "optuna.Study", target: int) -> int:
    """Trials still to run: the target less those finished, not counting interrupted ones."""
    from optuna.trial import TrialState

    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
                if not t.user_attrs.get(INTERRUPTED)]
    return max(target - len(finished), 0)


def _sweep_flow(spec: SweepSpec, sweep: str, runs_dir: str, storage: str | None) -> None:
    """Optuna's ``optimize`` over the remaining trials; each trial runs its pipeline as a subflow."""
    from flows.pipeline import pipeline
    from flows.report import run_report
    from flows.run_dir import prepare_run_dir

    study = open_study(spec, sweep, storage)
    stage, _, metric = spec.metric.partition(".")

    def objective(trial: "optuna.Trial") -> float:
        params = {key: trial.suggest_categorical(key, values) for key, values in spec.grid.items()}
        cfg = load_config(spec.config, trial_overrides(spec, params, sweep))
        run_dir = prepare_run_dir(Path(runs_dir), trial_run_id(sweep, params), cfg).resolve()
        artifacts.write_json(run_dir / TRIAL_FILE, {"sweep": sweep, "trial": trial.number, "params": params})
        trial.set_user_attr("run_id", run_dir.name)
        print(f"sweep {sweep}: trial {trial.number} {params} -> {run_dir.name}", flush=True)
        started = time.time()
        state = pipeline(str(run_dir), return_state=True)
        trial.set_user_attr("seconds", round(time.time() - started, 2))
        value = run_report(run_dir)["stages"].get(stage, {}).get("metrics", {}).get(metric)
        if state.is_failed() or not isinstance(value, (int, float)):
            error = state.message if state.is_failed() else f"{spec.metric} is not among its metrics"
            trial.set_user_attr("error", error)
            raise TrialFailed(f"trial {trial.number}: {error}")
        return float(value)

    study.optimize(objective, n_trials=remaining_trials(study, spec.target), catch=(TrialFailed,))


def sweep_flow(spec: SweepSpec, sweep: str, runs_dir: str, storage: str | None) -> None:
    from prefect import flow

    flow(name="rlhf-sweep", flow_run_name=_sweep_flow_run_name, validate_parameters=False)(_sweep_flow)(
        spec, sweep, runs_dir, storage)


def leaderboard(spec: SweepSpec, sweep: str, runs_dir: Path, storage: str | None) -> dict[str, Any]:
    """Every trial, best first (failed ones last): number, settings, metric, seconds, run id; written to
    ``<runs-dir>/sweeps/<name>/leaderboard.json`` with an HTML report beside it."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=sweep, storage=storage_url(storage))
    rows = [{"trial": t.number, "params": t.params, "value": t.value if t.state == TrialState.COMPLETE else None,
             "state": INTERRUPTED if t.user_attrs.get(INTERRUPTED) else t.state.name.lower(),
             "seconds": t.user_attrs.get("seconds"), "run_id": t.user_attrs.get("run_id"), "error": t.user_attrs.get("error")}
            for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]
    sign = -1 if spec.direction == "maximize" else 1
    rows.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0), r["trial"]))
    board = {"sweep": sweep, "metric": spec.metric, "direction": spec.direction, "trials": rows}
    folder = Path(runs_dir) / SWEEPS / sweep
    artifacts.write_json(folder / "leaderboard.json", board)
    from flows.sweep_report import write_sweep_report

    board["report"] = str(write_sweep_report(board, Path(runs_dir)))
    return board


def format_leaderboard(board: dict[str, Any]) -> str:
    lines = [f"sweep {board['sweep']}: {board['metric']} ({board['direction']})",
             f"{'rank':>4} {'trial':>5}  {'metric':>9} {'seconds':>8}  {'run':<22} settings"]
    for rank, row in enumerate(board["trials"], start=1):
        value = f"{row['value']:.4f}" if row["value"] is not None else row["state"]
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        settings = " ".join(f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"{rank:>4} {row['trial']:>5}  {value:>9} {seconds:>8}  {row['run_id'] or '-':<22} {settings}")
    return "\n".join(lines)
