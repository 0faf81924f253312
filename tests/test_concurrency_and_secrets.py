"""Two runs at once share the cache safely; a run id already running is refused; no secret is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY, run_cli

SETS = [arg for item in TINY for arg in ("--set", item)]
SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secretTOKEN0123456789"}


def _start(run_id: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    rlhf = Path(sys.executable).parent / "rlhf"
    return subprocess.Popen(
        [str(rlhf), "run", *SETS, "--run-id", run_id],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def test_concurrent_runs_finish_and_a_running_id_is_refused(tmp_path: Path) -> None:
    first, second = _start("a", tmp_path), _start("b", tmp_path)
    out_a, err_a = first.communicate(timeout=900)
    out_b, err_b = second.communicate(timeout=900)
    assert first.returncode == 0, err_a[-2000:]
    assert second.returncode == 0, err_b[-2000:]
    digests = set()
    for run_id in ("a", "b"):
        manifest = json.loads((tmp_path / "runs" / run_id / "ppo" / "manifest.json").read_text())
        digests.add(manifest["cache_key"])
        assert Path(os.environ["RLHF_HOME"], "cache", manifest["cache_key"], "manifest.json").is_file()
    assert len(digests) == 1  # same config, same key: both runs published into one shared entry
    leftovers = [p.name for p in Path(os.environ["RLHF_HOME"], "cache").iterdir() if ".tmp-" in p.name]
    assert not leftovers

    from filelock import FileLock

    with FileLock(str(tmp_path / "runs" / "a" / ".running.lock")):  # as if run "a" were still going
        refused = run_cli("run", *SETS, "--run-id", "a", cwd=tmp_path)
    assert refused.returncode == 2 and "run a is already running" in refused.stderr


def test_no_secret_reaches_any_file_of_a_run(tmp_path: Path) -> None:
    result = run_cli("run", *SETS, "--run-id", "secret", cwd=tmp_path, env=SECRETS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not any(value in result.stdout + result.stderr for value in SECRETS.values())
    files = [p for p in (tmp_path / "runs" / "secret").rglob("*") if p.is_file()]
    assert len(files) > 20  # configs, manifests, logs, W&B offline runs, adapters
    for path in files:
        data = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {path}"


def test_runs_started_at_the_same_instant_on_a_fresh_home_all_finish(tmp_path: Path) -> None:
    """Issue 29, fault 4: each `rlhf` command starts a temporary Prefect server on the one SQLite file of
    its RLHF_HOME, and each server creates the database as it starts: two runs started at once on a fresh
    home raced, and one died (`no such table: flow_run_alert_policy`) in one try of two. Four runs at the
    same instant, on three fresh homes in turn, must all finish."""
    backbones = Path(os.environ["RLHF_HOME"]) / "backbones"
    sets = [
        arg
        for item in [*TINY, "tracking.backend=none", "run.stages=[sft]", "sft.max_steps=1", "eval.num_prompts=2"]
        for arg in ("--set", item)
    ]
    rlhf = Path(sys.executable).parent / "rlhf"
    for attempt in range(3):
        home = tmp_path / f"home{attempt}"
        home.mkdir()
        (home / "backbones").symlink_to(backbones, target_is_directory=True)
        env = {**os.environ, "RLHF_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
        runs = [
            subprocess.Popen(
                [str(rlhf), "run", *sets, "--set", f"run.seed={n}", "--run-id", f"r{n}"],
                cwd=tmp_path / f"home{attempt}",
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for n in range(4)
        ]
        for n, run in enumerate(runs):
            _, err = run.communicate(timeout=900)
            assert run.returncode == 0, (attempt, n, err[-3000:])
