"""Against a real local Prefect server (as `prefect server start` serves the UI): the flow run, its task
runs and the stage artifacts are readable through Prefect's own client."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli

SETS = [arg for item in TINY for arg in ("--set", item)]
READ_BACK = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, LogFilter

async def main():
    async with get_client() as client:
        run = next(r for r in await client.read_flow_runs() if r.name == "served")
        only = FlowRunFilter(id={"any_": [run.id]})
        tasks = await client.read_task_runs(flow_run_filter=only)
        artifacts = await client.read_artifacts(flow_run_filter=only)
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run.id]}))
        print(json.dumps({"state": run.state.type.value, "tasks": {t.name: t.state.type.value for t in tasks},
                          "artifacts": {a.key: a.type for a in artifacts if a.key},
                          "logs": [log.message for log in logs]}))
asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path: Path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-server"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_ENABLED": "false",
    }
    prefect = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen(
        [str(prefect), "server", "start"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "prefect server did not start"
            time.sleep(1)
    yield api
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def test_runs_and_artifacts_are_readable_from_a_real_server(prefect_server: str, tmp_path: Path) -> None:
    env = {"PREFECT_API_URL": prefect_server}
    # a seed no other test uses: every stage runs (a cached stage has no process output to forward)
    result = run_cli("run", *SETS, "--set", "run.seed=11", "--run-id", "served", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    read = subprocess.run(
        [sys.executable, "-c", READ_BACK], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert read.returncode == 0, read.stderr[-2000:]
    seen = json.loads(read.stdout.strip().splitlines()[-1])
    assert seen["state"] == "COMPLETED"
    assert seen["tasks"] == {"sft": "COMPLETED", "reward": "COMPLETED", "ppo": "COMPLETED"}
    for stage in ("sft", "reward", "ppo"):
        assert seen["artifacts"][f"{stage}-metrics"] == "table"
        assert seen["artifacts"][f"{stage}-artifact"] == "markdown"
        # the stage process's own output reached the task's log in the UI
        assert any(line.startswith(f"{stage}: published ") for line in seen["logs"]), seen["logs"][-20:]


def test_served_deployment_runs_when_triggered(prefect_server: str, tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    rlhf = Path(sys.executable).parent / "rlhf"
    serve = subprocess.Popen(
        [str(rlhf), "serve", "--cron", "0 3 * * *", "--name", "nightly", *SETS, "--runs-dir", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        prefect = Path(sys.executable).parent / "prefect"
        deadline = time.time() + 180
        while True:  # the deployment exists once serve has registered it
            listed = subprocess.run([str(prefect), "deployment", "ls"], env=env, capture_output=True, text=True)
            if "nightly" in listed.stdout:
                break
            assert serve.poll() is None and time.time() < deadline, "rlhf serve did not register its deployment"
            time.sleep(2)
        triggered = subprocess.run(
            [str(prefect), "deployment", "run", "rlhf-scheduled/nightly", "--watch", "--watch-timeout", "900"],
            env=env,
            capture_output=True,
            text=True,
            timeout=960,
        )
        assert triggered.returncode == 0, triggered.stdout[-3000:] + triggered.stderr[-3000:]
        assert "Completed" in triggered.stdout + triggered.stderr
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
    runs = [p for p in (tmp_path / "runs").iterdir() if (p / "ppo" / "manifest.json").is_file()]
    assert len(runs) == 1, "the triggered run should have finished every stage"


FLOW_RUN = """
import asyncio, json, sys
from uuid import UUID
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter

async def main():
    async with get_client() as client:
        found = {}
        for flow_run_id in sys.argv[1:]:
            run = await client.read_flow_run(UUID(flow_run_id))
            artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            found[flow_run_id] = {"state": run.state.type.value, "message": run.state.message,
                                  "artifacts": {a.key: a.description for a in artifacts if a.key}}
        print(json.dumps(found))
asyncio.run(main())
"""


def _flow_runs(ids: list[str], env: dict[str, str]) -> dict[str, dict]:
    read = subprocess.run(
        [sys.executable, "-c", FLOW_RUN, *ids], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )
    assert read.returncode == 0, read.stderr[-2000:]
    return json.loads(read.stdout.strip().splitlines()[-1])


def _stage_processes(out: Path) -> list[int]:
    """The pids of processes whose command line names the stage folder ``out`` (a stage and its ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_killed_run_shows_crashed_and_resume_finishes_it(prefect_server: str, tmp_path: Path) -> None:
    """Issue 32, item 5, as measured with a persistent server: `rlhf run` killed with `kill -9` during the
    reward stage stayed `running` in `rlhf runs`, its status.json and Prefect. Now the next command finds
    its lock free and says `crashed` in all three; `rlhf resume` finishes the run, and the crashed flow run
    names the flow run that resumed it."""
    env = {"PREFECT_API_URL": prefect_server}
    runs = tmp_path / "runs"
    sets = [*SETS, "--set", "run.stages=[sft,reward]", "--set", "run.seed=12", "--set", "tracking.backend=none"]
    rlhf = Path(sys.executable).parent / "rlhf"
    running = subprocess.Popen(
        [str(rlhf), "run", "--run-id", "killed", "--runs-dir", str(runs), *sets],
        cwd=tmp_path,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    status = runs / "killed" / "status.json"
    deadline = time.time() + 300
    while not (status.is_file() and json.loads(status.read_text()).get("reward", {}).get("status") == "running"):
        assert running.poll() is None and time.time() < deadline, "the run never reached its reward stage"
        time.sleep(0.2)
    os.kill(running.pid, signal.SIGKILL)
    running.wait()
    deadline = time.time() + 60
    while _stage_processes(runs / "killed" / "reward"):  # the stage dies with its parent
        assert time.time() < deadline, "the reward stage outlived the killed run"
        time.sleep(0.5)
    assert json.loads(status.read_text())["reward"]["status"] == "running"  # what nothing had corrected
    killed_flow_run = json.loads((runs / "killed" / "flow_runs.json").read_text())[-1]["id"]
    assert _flow_runs([killed_flow_run], env)[killed_flow_run]["state"] == "RUNNING"

    listed = run_cli("runs", "--runs-dir", str(runs), cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert next(line for line in listed.stdout.splitlines() if line.startswith("killed")).split()[1] == "crashed"
    reward = json.loads(status.read_text())["reward"]
    assert reward["status"] == "crashed" and "`rlhf resume killed` finishes it" in reward["error"]
    crashed = _flow_runs([killed_flow_run], env)[killed_flow_run]
    assert crashed["state"] == "CRASHED" and "was gone at" in crashed["message"], crashed

    resumed = run_cli("resume", "killed", "--runs-dir", str(runs), cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert {entry["status"] for entry in json.loads(status.read_text()).values()} <= {"completed", "cached"}
    flow_runs = json.loads((runs / "killed" / "flow_runs.json").read_text())
    first, second = flow_runs[-2], flow_runs[-1]
    assert first["id"] == killed_flow_run and first["resumed_by"] == f"{second['name']} ({second['id']})"
    seen = _flow_runs([first["id"], second["id"]], env)
    assert seen[second["id"]]["state"] == "COMPLETED"
    old = seen[first["id"]]
    assert old["state"] == "CRASHED" and f"resumed by flow run {second['name']} ({second['id']})" in old["message"]
    assert old["artifacts"]["resumed-by"] == f"run killed was resumed by flow run {second['name']} ({second['id']})"
    listed = run_cli("runs", "--runs-dir", str(runs), cwd=tmp_path, env=env).stdout
    assert next(line for line in listed.splitlines() if line.startswith("killed")).split()[1] == "completed"
