"""`rlhf sweep`: Optuna trials as pipeline runs that share cached upstream stages, a sorted leaderboard
and its report, sweep membership in `rlhf runs`, the W&B group, and a killed sweep that resumes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from flows.sweep import INTERRUPTED, parse_grid
from stages.io.config import ConfigError
from tests.conftest import TINY, run_cli


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _statuses(run_dir: Path) -> dict[str, str]:
    return {stage: entry["status"] for stage, entry in json.loads((run_dir / "status.json").read_text()).items()}


def _empty_cache(root: Path) -> dict[str, str]:
    """An RLHF_HOME of the test's own that shares only the backbone build: no other test's stages can be
    served from its cache, whatever seed or settings they used."""
    home = root / "home"
    home.mkdir()
    (home / "backbones").symlink_to(Path(os.environ["RLHF_HOME"]) / "backbones", target_is_directory=True)
    return {"RLHF_HOME": str(home)}


def test_a_ppo_grid_trains_sft_and_reward_once_and_ranks_the_trials(tmp_path: Path) -> None:
    sets = _sets([*TINY, "tracking.backend=none"])
    done = run_cli(
        "sweep",
        *sets,
        "--grid",
        "ppo.learning_rate=[1e-4,1e-2]",
        "--grid",
        "ppo.kl_coef=[0.05,0.2]",
        "--metric",
        "ppo.kl_to_reference",
        "--direction",
        "min",
        "--name",
        "grid",
        cwd=tmp_path,
        env=_empty_cache(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    board = json.loads((tmp_path / "runs" / "sweeps" / "grid" / "leaderboard.json").read_text())
    trials = board["trials"]
    assert len(trials) == 4 and all(t["state"] == "complete" for t in trials)
    assert sorted(json.dumps(t["params"], sort_keys=True) for t in trials) == sorted(
        json.dumps({"ppo.learning_rate": lr, "ppo.kl_coef": kl}, sort_keys=True)
        for lr in (1e-4, 1e-2)
        for kl in (0.05, 0.2)
    )
    values = [t["value"] for t in trials]
    assert values == sorted(values)  # --direction min: best (lowest) first
    for t in trials:  # each value is its run's own metric
        run_dir = tmp_path / "runs" / t["run_id"]
        assert json.loads((run_dir / "ppo" / "manifest.json").read_text())["metrics"]["kl_to_reference"] == t["value"]
    statuses = [_statuses(tmp_path / "runs" / t["run_id"]) for t in trials]
    for stage in ("sft", "reward"):  # trained by one trial, taken from the cache by the three others
        assert sorted(s[stage] for s in statuses) == ["cached", "cached", "cached", "completed"]
    assert all(s["ppo"] == "completed" for s in statuses)
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("rank"))
    assert [line.split()[4] for line in lines[header + 1 : header + 5]] == [t["run_id"] for t in trials]
    page = (tmp_path / "runs" / "sweeps" / "grid" / "report.html").read_text()
    assert "ppo.kl_to_reference against ppo.learning_rate" in page and "best 3 trial(s)" in page
    listed = run_cli("runs", cwd=tmp_path).stdout
    assert all(f"grid#{t['trial']}" in listed for t in trials)
    config = (tmp_path / "runs" / trials[0]["run_id"] / "config.yaml").read_text()
    assert "group: grid" in config  # the W&B group of every stage of every trial (tests below: the tracker)


def test_the_tracker_groups_a_runs_stages_under_the_configured_group(tmp_path: Path) -> None:
    from stages.io.config import load_config
    from stages.training.tracking import WandbTracker

    tracker = WandbTracker(load_config(None, ["tracking.group=my-sweep"]), "sft", tmp_path / "trial-1", {})
    try:
        assert (tracker.run.group, tracker.run.name, tracker.run.job_type) == ("my-sweep", "trial-1-sft", "sft")
    finally:
        tracker.run.finish()


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).parent / "rlhf"),
        "sweep",
        *_sets([*TINY, "tracking.backend=none", "run.stages=[reward]", "reward.max_steps=30"]),
        "--grid",
        "reward.learning_rate=[1e-3,2e-3]",
        "--grid",
        "reward.batch_size=[4,8]",
        "--metric",
        "reward.pair_accuracy",
        "--name",
        "killed",
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    storage = f"sqlite:///{os.environ['RLHF_HOME']}/sweeps.db"
    deadline = time.time() + 300

    def finished() -> int:
        try:
            study = optuna.load_study(study_name="killed", storage=storage)
        except KeyError:
            return 0
        return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    while finished() < 1 or not any(
        _statuses(d).get("reward") == "running"
        for d in (tmp_path / "runs").glob("killed-*")
        if (d / "status.json").is_file()
    ):
        assert process.poll() is None and time.time() < deadline, "the sweep ended before a second trial began"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = json.loads((tmp_path / "runs" / "sweeps" / "killed" / "leaderboard.json").read_text())["trials"]
    complete = [t for t in trials if t["state"] == "complete"]
    interrupted = [t for t in trials if t["state"] == INTERRUPTED]
    assert len(complete) == 4 and len(interrupted) == 1 and len(trials) == 5
    assert len({json.dumps(t["params"], sort_keys=True) for t in complete}) == 4  # the whole grid, once each
    rerun = next(t for t in complete if t["params"] == interrupted[0]["params"])
    assert rerun["run_id"] == interrupted[0]["run_id"]  # the same run folder: its checkpoints and cache


def test_grid_flags_are_checked_before_anything_runs(tmp_path: Path) -> None:
    assert parse_grid(["ppo.kl_coef=[0.05, 0.2]", "adapter.kind=[lora,dora]", "ppo.learning_rate=[1e-4,5e-4]"]) == {
        "ppo.kl_coef": [0.05, 0.2],
        "adapter.kind": ["lora", "dora"],
        "ppo.learning_rate": [1e-4, 5e-4],
    }
    for bad in ("ppo.kl_coef=0.05", "ppo.kl_coef=[]", "=[1]"):
        with pytest.raises(ConfigError, match="expected KEY.PATH=\\[VALUE,...\\]"):
            parse_grid([bad])
    wrong_metric = run_cli("sweep", "--grid", "ppo.kl_coef=[0.1]", "--metric", "dpo.task_score", cwd=tmp_path)
    assert wrong_metric.returncode == 2 and "stage dpo is not in run.stages" in wrong_metric.stderr
    bad_value = run_cli("sweep", "--grid", "ppo.kl_coef=[0.1,-1]", "--metric", "ppo.task_score", cwd=tmp_path)
    assert bad_value.returncode == 2 and "ppo.kl_coef" in bad_value.stderr and not (tmp_path / "runs").exists()


def test_a_storage_password_never_reaches_disk() -> None:
    """``runs/sweeps/<name>/sweep.json`` records the storage as ``shown_url`` gives it; the URL itself is
    kept out of the Prefect flow run's parameters (``sweep_flow``)."""
    from flows.sweep import shown_url

    assert shown_url("postgresql://bob:s3cret@db:5432/optuna") == "postgresql://bob:***@db:5432/optuna"
    assert shown_url("sqlite:////home/me/.rlhf/sweeps.db") == "sqlite:////home/me/.rlhf/sweeps.db"
    assert "s3cret" not in shown_url("redis://bob:s3cret@host") + shown_url("bob:s3cret")


@pytest.mark.parametrize(
    ("sampler", "kind"), [("grid", "GridSampler"), ("random", "RandomSampler"), ("tpe", "TPESampler")]
)
def test_each_sampler_draws_only_the_listed_values(sampler: str, kind: str, tmp_path: Path) -> None:
    from flows.sweep import SweepSpec, check_spec, open_study

    grid = {"ppo.kl_coef": [0.05, 0.2], "adapter.kind": ["lora", "dora"]}
    spec = SweepSpec(
        config=None,
        overrides=("tracking.backend=none",),
        grid=grid,
        metric="ppo.task_score",
        direction="maximize",
        sampler=sampler,
        trials=None if sampler == "grid" else 3,
    )
    check_spec(spec)
    assert spec.target == (4 if sampler == "grid" else 3)
    study = open_study(spec, f"s-{sampler}", f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert type(study.sampler).__name__ == kind
    drawn: list[tuple] = []

    def objective(trial: optuna.Trial) -> float:
        drawn.append(tuple(trial.suggest_categorical(k, v) for k, v in grid.items()))
        return 0.5

    study.optimize(objective, n_trials=4)  # as the sweep does: GridSampler stops the study from inside it
    assert all(kl in grid["ppo.kl_coef"] and kind_ in grid["adapter.kind"] for kl, kind_ in drawn)
    if sampler == "grid":
        assert len(set(drawn)) == 4  # every combination once
    refused = pytest.raises(ConfigError, match=f"--sampler {sampler} needs --trials N")
    with refused if sampler != "grid" else contextlib.nullcontext():
        check_spec(SweepSpec(None, (), grid, "ppo.task_score", "maximize", sampler=sampler))


def test_a_restart_requeues_dead_and_interrupted_trials_only(tmp_path: Path) -> None:
    from filelock import FileLock

    from flows.sweep import SweepSpec, open_study

    spec = SweepSpec(
        config=None,
        overrides=(),
        grid={"ppo.kl_coef": [0.1, 0.2, 0.3, 0.4]},
        metric="ppo.task_score",
        direction="maximize",
    )
    storage, runs = f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "runs"
    study = open_study(spec, "s", storage, runs)
    for value in spec.grid["ppo.kl_coef"]:
        study.enqueue_trial({"ppo.kl_coef": value})  # one trial per value, in order
    trials = [study.ask() for _ in range(4)]
    for trial in trials:
        trial.suggest_categorical("ppo.kl_coef", spec.grid["ppo.kl_coef"])
    for trial, name in zip(trials[:3], ("dead", "live", "elsewhere"), strict=True):
        trial.set_user_attr("run_id", name)
    (runs / "dead").mkdir(parents=True)
    (runs / "live").mkdir()  # "elsewhere" has no folder here: another machine's
    trials[3].set_user_attr(INTERRUPTED, True)  # a Ctrl-C: Optuna records it failed
    study.tell(trials[3], state=optuna.trial.TrialState.FAIL)
    with FileLock(str(runs / "live" / ".running.lock")):  # a live process still runs "live"
        reopened = open_study(spec, "s", storage, runs)
    states = {t.user_attrs.get("run_id", "ctrl-c"): t for t in reopened.get_trials()}
    assert states["dead"].state.name == "FAIL" and states["dead"].user_attrs[INTERRUPTED]
    assert states["live"].state.name == "RUNNING" and states["elsewhere"].state.name == "RUNNING"
    waiting = reopened.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(t.system_attrs["fixed_params"]["ppo.kl_coef"] for t in waiting) == [0.1, 0.4]
    with FileLock(str(runs / "live" / ".running.lock")):
        open_study(spec, "s", storage, runs)  # a second restart queues nothing twice
    assert len(reopened.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 2


LOCKER = """import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")  # no other connection may read or write until COMMIT
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""


def _lock(database: Path, seconds: float) -> subprocess.Popen:
    """Another process holding a write lock on ``database`` for ``seconds`` (as a backup or a sqlite3 shell
    would); returns once the lock is held."""
    database.parent.mkdir(parents=True, exist_ok=True)
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(database), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert locker.stdout.readline().strip() == "locked"
    return locker


def test_a_sweep_waits_out_a_database_locked_as_a_trial_finishes(tmp_path: Path) -> None:
    """Issue 29, fault 3: a write lock held for more than SQLite's 5 s while a trial trained crashed the
    sweep after the trial finished (UnboundLocalError in Optuna, 125 lines), and the trial's result was
    lost. Now statements wait up to --db-wait (120 s): locked for 10 s from the moment the first trial's
    stage is published, the sweep finishes with both trials recorded."""
    env = _empty_cache(tmp_path)
    command = [
        str(Path(sys.executable).parent / "rlhf"),
        "sweep",
        *_sets([*TINY, "tracking.backend=none", "run.stages=[reward]", "reward.max_steps=8"]),
        "--grid",
        "reward.learning_rate=[1e-3,2e-3]",
        "--metric",
        "reward.pair_accuracy",
        "--name",
        "locked",
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    deadline = time.time() + 300
    while not any((d / "reward" / "manifest.json").is_file() for d in (tmp_path / "runs").glob("locked-*")):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    locker = _lock(Path(env["RLHF_HOME"]) / "sweeps.db", 10)  # as trial 0 is told, or trial 1 asked for
    out, err = process.communicate(timeout=600)
    locker.wait()
    assert process.returncode == 0, err[-3000:]
    trials = json.loads((tmp_path / "runs" / "sweeps" / "locked" / "leaderboard.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete"], trials


def test_a_database_locked_past_the_wait_stops_the_sweep_in_one_line(tmp_path: Path) -> None:
    env = _empty_cache(tmp_path)
    database = Path(env["RLHF_HOME"]) / "sweeps.db"
    locker = _lock(database, 60)
    try:
        done = run_cli(
            "sweep",
            *_sets([*TINY, "tracking.backend=none", "run.stages=[reward]"]),
            "--grid",
            "reward.learning_rate=[1e-3,2e-3]",
            "--metric",
            "reward.pair_accuracy",
            "--db-wait",
            "2",
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
    finally:
        locker.kill()
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: {database}: the sweep database was locked by another process past --db-wait (2 s; open in "
    )
    assert f"pid {locker.pid} ({sys.executable} -c import sqlite3" in last, last
    assert last.endswith("finished trials are kept: run the same command again once it is free, or raise --db-wait")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*-*"))


def test_the_db_wait_help_names_the_default_the_sweep_uses() -> None:
    """`--db-wait`'s default lives in flows.sweep, which `rlhf --help` does not import (pydantic, yaml)."""
    from flows.cli import build_parser
    from flows.sweep import DB_WAIT_S

    sweep = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["sweep"]._actions if a.dest == "db_wait"
    )
    assert sweep.default is None and f"(default {DB_WAIT_S:g})" in sweep.help
