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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flows.run_dir import is_running, prepare_run_dir, read_stages, run_lock, sweep_dir, write_trial
from flows.sweep_report import write_sweep_report
from stages.io import artifacts
from stages.io.config import ConfigError, load_config
from stages.io.paths import rlhf_home

if TYPE_CHECKING:
    import optuna

INTERRUPTED = "interrupted"  # user attr of a trial killed or stopped by Ctrl-C: its settings run again
DB_WAIT_S = 120.0  # --db-wait: how long a statement waits for another process's lock on a SQLite study


@dataclass(frozen=True)
class SweepSpec:
    """What to search: the base config, the values of each swept key, how to sample, what to optimise."""

    config: Path | None
    overrides: tuple[str, ...]
    grid: dict[str, list[Any]]
    metric: str  # stage.metric, e.g. ppo.task_score
    direction: Literal["maximize", "minimize"]
    sampler: str = "grid"
    trials: int | None = None  # random/tpe: how many; grid: every combination
    seed: int = 0

    @property
    def combinations(self) -> int:
        return len(list(itertools.product(*self.grid.values())))

    @property
    def target(self) -> int:
        return self.combinations if self.sampler == "grid" and self.trials is None else int(self.trials or 0)

    def name(self, runs_dir: Path) -> str:
        """A stable name: the same command (over the same runs folder) continues the same study."""
        base = Path(self.config).read_text() if self.config else ""
        payload = json.dumps(
            [
                base,
                self.overrides,
                self.grid,
                self.metric,
                self.direction,
                self.sampler,
                self.trials,
                self.seed,
                str(Path(runs_dir).resolve()),
            ],
            sort_keys=True,
            default=str,
        )
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
            raise ConfigError(
                f"--grid {item!r}: expected KEY.PATH=[VALUE,...], e.g. --grid ppo.learning_rate=[1e-4,5e-4]"
            )
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
    if spec.sampler == "grid" and spec.trials and spec.trials > spec.combinations:
        raise ConfigError(f"--trials {spec.trials}: the grid has only {spec.combinations} combinations")
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


class StudyLocked(RuntimeError):
    """The study's SQLite database stayed locked by another process for longer than ``--db-wait``."""


def study_storage(storage: str | None, wait_s: float = DB_WAIT_S) -> optuna.storages.RDBStorage:
    """The Optuna storage of ``storage_url``. On SQLite every statement waits up to ``wait_s`` seconds for
    a lock another process holds (SQLite's busy timeout, 5 s by default), instead of failing at once:
    a backup, a second sweep or a ``sqlite3`` shell that writes for longer crashed the sweep with a
    SQLAlchemy traceback, after a trial had trained, and lost its result (Optuna #820, #4994)."""
    import optuna

    url = storage_url(storage)
    if not url.startswith("sqlite:///"):
        return optuna.storages.RDBStorage(url)
    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": wait_s}})


@contextmanager
def locked_study_named(storage: str | None, wait_s: float) -> Iterator[None]:
    """Turn SQLite's "database is locked" (after up to ``wait_s`` seconds of waiting) into ``StudyLocked``:
    one line naming the database and, where /proc shows them, the other processes that have it open. Other
    storages' errors pass unchanged (their message may hold a password: ``shown_url``)."""
    url = storage_url(storage)
    try:
        yield
    except Exception as err:  # Optuna's own post-processing turns a failed tell into an UnboundLocalError
        if not url.startswith("sqlite:///") or not _caused_by_a_lock(err):
            raise
        database = url.removeprefix("sqlite:///")
        holders = ", ".join(_processes_holding(Path(database))) or "no other process of this machine"
        raise StudyLocked(
            f"{database}: the sweep database was locked by another process past --db-wait ({wait_s:g} s; "
            f"open in {holders}); finished trials are kept: run the same command again once it is "
            "free, or raise --db-wait"
        ) from None


def _caused_by_a_lock(err: BaseException | None) -> bool:
    """Whether SQLite's "database is locked" is ``err`` or anywhere in its chain of causes and contexts."""
    from sqlalchemy.exc import OperationalError

    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OperationalError) and "locked" in str(err.orig):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _processes_holding(path: Path) -> list[str]:
    """'pid 123 (python -m ...)' for each other process with ``path`` (or its journal) open (Linux /proc)."""
    import os

    names = {str(path.resolve()) + suffix for suffix in ("", "-journal", "-wal")}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) in names for fd in (proc / "fd").iterdir()):
                command = " ".join((proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
                found.append(f"pid {proc.name} ({command[:80]})")
        except OSError:  # gone, or not ours to read
            continue
    return found


def shown_url(url: str) -> str:
    """``url`` with its password masked (``postgresql://user:***@host/db``): what may be written to disk
    or shown. A URL SQLAlchemy cannot parse is shown only by its scheme, if it has one."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        scheme, separator, _ = url.partition("://")
        return f"{scheme}://..." if separator else "(a storage URL, not shown)"


def open_study(
    spec: SweepSpec, sweep: str, storage: str | None, runs_dir: Path | None = None, wait_s: float = DB_WAIT_S
) -> optuna.Study:
    """The sweep's Optuna study, created or continued, with its sampler.

    Continuing, a trial to run again has its settings queued first: one interrupted by Ctrl-C (marked
    ``interrupted`` by the objective), and one left ``RUNNING`` whose run folder in ``runs_dir`` no process
    holds (``.running.lock``: its process was killed). A trial another live process runs is left alone, so
    several processes can share a study. Random and TPE samplers continue with a seed moved on by the trials
    already in the study, so they do not draw the same settings again.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = study_storage(storage, wait_s)
    study = optuna.create_study(study_name=sweep, storage=rdb, direction=spec.direction, load_if_exists=True)
    trials = study.get_trials(deepcopy=False)
    seed = spec.seed + len(trials)
    study.sampler = {
        "grid": lambda: optuna.samplers.GridSampler(spec.grid, seed=spec.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
    }[spec.sampler]()
    for trial in trials:
        if trial.state == TrialState.RUNNING and runs_dir is not None:
            run_id = trial.user_attrs.get("run_id")
            if run_id and not (Path(runs_dir) / run_id).is_dir():
                continue  # another machine's trial, in its own runs folder
            if run_id and is_running(Path(runs_dir) / run_id):
                continue  # another process is running it
            # dead: its process was killed (also one killed before it named its run folder)
            _fail_as_interrupted(rdb, sweep, trial.number)
        elif not (trial.state == TrialState.FAIL and trial.user_attrs.get(INTERRUPTED)):
            continue
        if not _queued_again(trial, trials):
            study.enqueue_trial(trial.params, skip_if_exists=False)
    return study


def _fail_as_interrupted(storage: optuna.storages.RDBStorage, sweep: str, number: int) -> None:
    """Mark a dead trial failed and ``interrupted`` (its settings run again), through the public methods of
    the storage ``study_storage`` built. Not ``Study.tell``: it also runs the sampler's ``after_trial``, and
    the grid sampler calls ``Study.stop`` there when the trial is its last unfinished combination, which
    raises outside ``optimize``."""
    from optuna.trial import TrialState

    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(sweep), number)
    storage.set_trial_user_attr(trial_id, INTERRUPTED, True)  # before FAIL: then the trial is final
    storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _queued_again(trial: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial]) -> bool:
    """Whether a later trial has (or, still waiting, will have) this trial's settings."""
    return any(
        t.number > trial.number and (t.params or t.system_attrs.get("fixed_params")) == trial.params for t in trials
    )


def run_sweep(
    spec: SweepSpec, runs_dir: Path, storage: str | None = None, name: str | None = None, wait_s: float = DB_WAIT_S
) -> dict[str, Any]:
    """Run the sweep's remaining trials as Prefect subflows of one ``rlhf-sweep`` flow run; return its
    leaderboard (``leaderboard``). Raises ``StudyLocked`` when a SQLite study stays locked by another
    process for ``wait_s`` seconds (a trial that finished meanwhile is recorded by the next run: its
    settings are queued again, and its stages come from the cache of its run folder)."""
    sweep = name or spec.name(runs_dir)
    folder = sweep_dir(runs_dir, sweep)
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(
        folder / "sweep.json",
        {
            "name": sweep,
            "config": str(spec.config) if spec.config else None,
            "overrides": list(spec.overrides),
            "grid": spec.grid,
            "metric": spec.metric,
            "direction": spec.direction,
            "sampler": spec.sampler,
            "trials": spec.target,
            "storage": shown_url(storage_url(storage)),
        },
    )
    locked = sweep_flow(spec, sweep, str(Path(runs_dir).resolve()), storage, wait_s)
    if locked:
        raise StudyLocked(locked)
    with locked_study_named(storage, wait_s):
        return leaderboard(spec, sweep, Path(runs_dir), storage, wait_s)


def _sweep_flow_run_name() -> str:
    from prefect.runtime import flow_run

    return flow_run.parameters["sweep"]


class TrialFailed(RuntimeError):
    """A trial whose pipeline failed: recorded as failed, and the sweep goes on."""


def remaining_trials(study: optuna.Study, target: int) -> int:
    """Trials still to run: the target less those finished, not counting interrupted ones."""
    from optuna.trial import TrialState

    finished = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        if not t.user_attrs.get(INTERRUPTED)
    ]
    return max(target - len(finished), 0)


def _sweep_flow(spec: SweepSpec, sweep: str, runs_dir: str, storage: str | None, wait_s: float) -> str | None:
    """Optuna's ``optimize`` over the remaining trials; each trial runs its pipeline as a subflow. Returns
    ``StudyLocked``'s message instead of raising it, so the flow ends without a traceback in its log."""
    try:
        with locked_study_named(storage, wait_s):
            _optimize(spec, sweep, runs_dir, storage, wait_s)
    except StudyLocked as err:
        return str(err)
    return None


def _optimize(spec: SweepSpec, sweep: str, runs_dir: str, storage: str | None, wait_s: float) -> None:
    from flows.dashboard import rebuild_dashboard
    from flows.liveness import reconcile
    from flows.pipeline import pipeline

    study = open_study(spec, sweep, storage, Path(runs_dir), wait_s)
    stage, _, metric = spec.metric.partition(".")

    def objective(trial: optuna.Trial) -> float:
        params = {key: trial.suggest_categorical(key, values) for key, values in spec.grid.items()}
        cfg = load_config(spec.config, trial_overrides(spec, params, sweep))
        run_dir = prepare_run_dir(Path(runs_dir), trial_run_id(sweep, params), cfg).resolve()
        write_trial(run_dir, sweep, trial.number, params)
        reconcile(run_dir, tell_prefect=False)  # a trial a killed sweep left running: crashed, then run again
        print(f"sweep {sweep}: trial {trial.number} {params} -> {run_dir.name}", flush=True)
        started = time.time()
        with run_lock(run_dir):  # held while it runs: open_study tells live trials from dead ones
            trial.set_user_attr("run_id", run_dir.name)
            try:
                state = pipeline(str(run_dir), return_state=True)
            except KeyboardInterrupt:
                trial.set_user_attr(INTERRUPTED, True)  # Optuna records it failed: its settings run again
                raise
        trial.set_user_attr("seconds", round(time.time() - started, 2))
        print(f"runs: {rebuild_dashboard(Path(runs_dir))}", flush=True)  # a trial is a run like any other
        if state.is_failed():
            trial.set_user_attr("error", state.message)
            raise TrialFailed(f"trial {trial.number}: {state.message}")
        found = read_stages(run_dir)[stage]["metrics"]
        if not isinstance(found.get(metric), (int, float)):  # the same for every trial: stop the sweep now
            numeric = sorted(k for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise ConfigError(
                f"--metric {spec.metric}: {stage} reports no numeric {metric!r}; it has {', '.join(numeric)}"
            )
        return float(found[metric])

    study.optimize(objective, n_trials=remaining_trials(study, spec.target), catch=(TrialFailed,))


def sweep_flow(
    spec: SweepSpec, sweep: str, runs_dir: str, storage: str | None, wait_s: float = DB_WAIT_S
) -> str | None:
    """``_sweep_flow`` as the ``rlhf-sweep`` flow run. The storage URL is not one of its parameters:
    Prefect keeps those in its database, and a URL may hold a password."""
    from prefect import flow

    def rlhf_sweep(spec: SweepSpec, sweep: str, runs_dir: str) -> str | None:
        return _sweep_flow(spec, sweep, runs_dir, storage, wait_s)

    return flow(name="rlhf-sweep", flow_run_name=_sweep_flow_run_name, validate_parameters=False)(rlhf_sweep)(
        spec, sweep, runs_dir
    )


def leaderboard(
    spec: SweepSpec, sweep: str, runs_dir: Path, storage: str | None, wait_s: float = DB_WAIT_S
) -> dict[str, Any]:
    """Every trial, best first (failed ones last): number, settings, metric, seconds, run id; written to
    ``<runs-dir>/sweeps/<name>/leaderboard.json`` with an HTML report beside it."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=sweep, storage=study_storage(storage, wait_s))
    rows: list[dict[str, Any]] = [
        {
            "trial": t.number,
            "params": t.params,
            "value": t.value if t.state == TrialState.COMPLETE else None,
            "state": INTERRUPTED if t.user_attrs.get(INTERRUPTED) else t.state.name.lower(),
            "seconds": t.user_attrs.get("seconds"),
            "run_id": t.user_attrs.get("run_id"),
            "error": t.user_attrs.get("error"),
        }
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.RUNNING
    ]
    sign = -1 if spec.direction == "maximize" else 1
    rows.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0), r["trial"]))
    board = {"sweep": sweep, "metric": spec.metric, "direction": spec.direction, "trials": rows}
    artifacts.write_json(sweep_dir(runs_dir, sweep) / "leaderboard.json", board)
    board["report"] = str(write_sweep_report(board, Path(runs_dir)))
    return board


def format_leaderboard(board: dict[str, Any]) -> str:
    lines = [
        f"sweep {board['sweep']}: {board['metric']} ({board['direction']})",
        f"{'rank':>4} {'trial':>5}  {'metric':>9} {'seconds':>8}  {'run':<22} settings",
    ]
    for rank, row in enumerate(board["trials"], start=1):
        value = f"{row['value']:.4f}" if row["value"] is not None else row["state"]
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        settings = " ".join(f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"{rank:>4} {row['trial']:>5}  {value:>9} {seconds:>8}  {row['run_id'] or '-':<22} {settings}")
    return "\n".join(lines)
