"""Kill and resume: a stage killed with SIGKILL after a checkpoint resumes from it on the next run and
ends with the full history, for every stage kind."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.launch import launch_env
from stages.io import artifacts
from stages.io.config import load_config
from stages.io.samples import read_samples
from stages.registry import spec
from stages.training.checkpoints import checkpoint_root
from tests.conftest import TINY, stage_command, train_upstream

# Long enough that the first checkpoint comes well before the end; kill as soon as it exists.
LONG = {
    "sft": ["sft.max_steps=60", "sft.checkpoint_every=4"],
    "reward": ["reward.max_steps=100", "reward.checkpoint_every=5"],
    "rrhf": ["rrhf.max_steps=100", "rrhf.checkpoint_every=5"],
    "ppo": ["ppo.updates=40", "ppo.checkpoint_every=2"],
    "dpo": ["dpo.max_steps=60", "dpo.logging_steps=2", "dpo.checkpoint_every=4"],
    "grpo": ["grpo.max_steps=30", "grpo.checkpoint_every=2", "grpo.prompts_per_step=4", "grpo.num_generations=3"],
}
HISTORY_STEP = {"sft": "step", "reward": "step", "rrhf": "step", "ppo": "update", "dpo": "step", "grpo": "step"}


ADALORA = ["adapter.kind=adalora", "ppo.value_model=shared"]


@pytest.fixture(scope="module")
def upstream_adalora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_upstream(tmp_path_factory.mktemp("upstream-adalora"), [*TINY, "tracking.backend=none", *ADALORA])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_upstream(tmp_path_factory.mktemp("upstream"), [*TINY, "tracking.backend=none"])


def _finished_checkpoint(stage: str, out: Path) -> Path | None:
    root = checkpoint_root(out)
    if spec(stage).hf_trainer:  # the HF Trainer's checkpoints: complete once trainer_state.json is written
        done = [c for c in root.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    else:
        done = [c for c in root.glob("step-*") if artifacts.is_finished(c)]
    return max(done, default=None)


@pytest.mark.parametrize(
    ("stage", "launch"),
    [
        ("sft", []),
        ("reward", []),
        ("rrhf", []),
        ("ppo", []),
        ("dpo", []),
        ("grpo", []),
        ("grpo", ["run.stages=[sft,grpo]", "grpo.reward=checker"]),  # no reward model
        ("reward", ["reward.launcher=accelerate", "distributed.deepspeed=zero2"]),  # every rank's ZeRO partition
        ("sft", ["adapter.dropout=0.1"]),
        ("reward", ["adapter.dropout=0.1"]),  # dropout masks replay too
        ("ppo", ["ppo.value_model=shared"]),  # no value adapter: the policy and the value head are the state
        ("ppo", ["run.stages=[sft,ppo]", "ppo.reward=checker"]),  # no reward model: the value adapter from SFT
        # AdaLoRA's rank allocator keeps importance averages from the first update: they are training state
        ("sft", ADALORA),
        ("reward", ADALORA),
        ("rrhf", ADALORA),
        ("dpo", ADALORA),  # an SFT adapter at its allocated ranks, own loop and HF Trainer
        # Early stopping's progress (best value, evaluations without improvement) is training state: killed
        # after a checkpoint, the resumed stage must stop exactly where the uninterrupted one does.
        ("reward", ["reward.early_stopping={metric: pair_accuracy, patience: 3, eval_every: 5}"]),
        ("sft", ["sft.early_stopping={metric: eval_loss, mode: min, min_delta: 100, patience: 2, eval_every: 4}"]),
    ],
    ids=[
        "sft",
        "reward",
        "rrhf",
        "ppo",
        "dpo",
        "grpo",
        "grpo-checker",
        "reward-zero2",
        "sft-dropout",
        "reward-dropout",
        "ppo-shared-value",
        "ppo-checker",
        "sft-adalora",
        "reward-adalora",
        "rrhf-adalora",
        "dpo-adalora",
        "reward-early-stop",
        "sft-early-stop",
    ],
)
def test_killed_stage_resumes_from_its_last_checkpoint(
    stage: str, launch: list[str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    out = tmp_path / stage
    sets = [*TINY, "tracking.backend=none", *LONG[stage], *launch]
    upstream = request.getfixturevalue("upstream_adalora" if launch == ADALORA else "upstream")
    inputs = {name: upstream[name] for name in spec(stage).needed_inputs(load_config(None, sets))}
    command = stage_command(stage, out, sets, inputs)
    env = launch_env(load_config(None, sets), stage)
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    deadline = time.time() + 300
    while _finished_checkpoint(stage, out) is None:
        assert process.poll() is None and time.time() < deadline, f"{stage} ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # a hard kill, as an OOM killer or a preemption would
    process.wait()
    assert not artifacts.is_finished(out)
    saved = int(_finished_checkpoint(stage, out).name.rsplit("-", 1)[1])

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = artifacts.read_manifest(out)
    resumed = manifest["metrics"]["resumed_from_update" if stage == "ppo" else "resumed_from_step"]
    assert resumed >= saved > 0
    total = int(next(s for s in LONG[stage] if "max_steps" in s or "updates" in s).split("=")[1])
    if any("early_stopping" in item for item in launch):
        total = manifest["metrics"]["stopped_at_step"]
        assert total is not None and resumed < total, "the stage must stop early, after the resume"
    steps = [row[HISTORY_STEP[stage]] for row in json.loads((out / "history.json").read_text())]
    assert steps[-1] == total and steps == sorted(set(steps))  # one unbroken history, no step twice
    assert not checkpoint_root(out).exists()  # the published artifact supersedes its checkpoints
    if not any("launcher=accelerate" in item for item in launch):
        # Exact replay (issue 14, fault 5): the resumed run draws the batches and dropout masks an
        # uninterrupted one does, so its history and its weights are the same, byte for byte.
        straight = tmp_path / f"{stage}-uninterrupted"
        run = subprocess.run(
            stage_command(stage, straight, sets, inputs), capture_output=True, text=True, timeout=600, env=env
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads((out / "history.json").read_text()) == json.loads((straight / "history.json").read_text())
        # The sample tables of the steps before the kill came back from the checkpoint (issue 32).
        assert read_samples(out) == read_samples(straight) and (stage == "reward") != bool(read_samples(out))
        weights = sorted(path.relative_to(straight) for path in straight.rglob("*.safetensors"))
        assert weights and weights == sorted(path.relative_to(out) for path in out.rglob("*.safetensors"))
        for path in weights:
            assert (out / path).read_bytes() == (straight / path).read_bytes(), f"{path} differs after the resume"
        uninterrupted = artifacts.read_manifest(straight)["metrics"]
        for key in ("stopped_at_step", "stop_reason", "early_stopping"):
            assert manifest["metrics"].get(key) == uninterrupted.get(key), key
    if stage in ("reward", "rrhf"):  # the resumed schedule goes on where it stopped, on every launcher
        _assert_follows_the_schedule(
            json.loads((out / "history.json").read_text()), getattr(load_config(None, sets), stage)
        )


def _running(pid: int) -> bool:
    """Alive and not a zombie (a re-parented process is reaped by whoever PID 1 is, maybe late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _assert_follows_the_schedule(history: list[dict], section: object) -> None:
    """Update n (step n + 1) uses learning_rate x schedule(n): warmup then cosine, as the HF Trainer."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=section.learning_rate)
    factor = get_cosine_schedule_with_warmup(dummy, section.warmup_steps, section.max_steps).lr_lambdas[0]
    for row in history:
        assert row["learning_rate"] == pytest.approx(section.learning_rate * factor(row["step"] - 1), rel=1e-6), row


def test_killed_run_finishes_with_rlhf_resume(tmp_path: Path) -> None:
    """``kill -9`` of the flow process itself, right after SFT was published: ``rlhf resume`` keeps SFT and
    finishes the chain (the reward stage it was running dies with it: no orphaned trainer)."""
    from tests.conftest import run_cli

    rlhf = Path(sys.executable).parent / "rlhf"
    sets = [a for s in [*TINY, "tracking.backend=none", "reward.max_steps=400"] for a in ("--set", s)]
    process = subprocess.Popen(
        [str(rlhf), "run", "--run-id", "killed", *sets],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.time() + 300
    while not (run_dir / "logs" / "reward.log").is_file():
        assert process.poll() is None and time.time() < deadline, "the run ended before its reward stage"
        time.sleep(0.05)
    trainer = ["pgrep", "-f", f"stages.training.entry reward .*{run_dir}"]  # the reward stage's process
    while not subprocess.run(trainer, capture_output=True, text=True).stdout.strip():
        assert process.poll() is None and time.time() < deadline, "the reward stage's process never started"
        time.sleep(0.05)
    server = subprocess.run(
        ["pgrep", "-P", str(process.pid), "-f", "uvicorn.*prefect.server.api.server"], capture_output=True, text=True
    ).stdout.split()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(2)
    assert artifacts.is_finished(run_dir / "sft") and not artifacts.is_finished(run_dir / "reward")
    orphans = subprocess.run(trainer, capture_output=True, text=True).stdout
    assert not orphans.strip(), "the reward trainer outlived the flow that started it"
    assert len(server) == 1, "the flow's temporary Prefect server was not found"
    deadline = time.time() + 15  # issue 14, fault 5: the server's watchdog stops it within a few seconds
    while _running(int(server[0])) and time.time() < deadline:
        time.sleep(0.2)
    alive = _running(int(server[0]))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left, so a failure does not leak into other tests
    assert not alive, "Prefect's temporary server outlived the flow process that started it"

    resumed = run_cli("resume", "killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["sft"]["status"] == "cached" and status["reward"]["status"] == "completed"
    assert status["ppo"]["status"] == "completed"


def test_nan_loss_stops_the_stage_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """A learning rate of 1e30 blows the reward model up within a few steps: the stage stops with one line
    before the update that would poison the weights, and its last good checkpoint stays for a resume.
    (1e8 ran all 30 steps with finite losses on an AVX-512/AMX CPU; Adam's steps are about the learning
    rate whatever the gradient, so 1e30 overflows float32 on any CPU.)"""
    out = tmp_path / "reward"
    sets = [
        *TINY,
        "tracking.backend=none",
        "reward.max_steps=30",
        "reward.checkpoint_every=1",
        "reward.learning_rate=1e30",
    ]
    result = subprocess.run(stage_command("reward", out, sets), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: reward loss at step ") and (" is nan " in error or " is inf " in error), error
    failed_step = int(error.split("at step ")[1].split()[0])
    assert not out.exists()
    kept = _finished_checkpoint("reward", out)
    assert kept is not None and artifacts.read_manifest(kept)["step"] == failed_step - 1
