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
    return subprocess.Popen([str(rlhf), "run", *SETS, "--run-id", run_id], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


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
