"""PPO on one backbone: every kind runs, gradients reach both trainable adapters, nothing else moves,
the base is held once, and a killed run resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages import artifacts
from stages.backbone import base_parameters, load_backbone, weights_digest
from stages.config import load_config
from stages.ppo import POLICY, REFERENCE, REWARD, VALUE, build_actors, collect_rollout, ppo_update, train_ppo
from stages.reward import train_reward
from stages.runner import execute
from stages.sft import train_sft
from tests.conftest import TINY

FAST = [*TINY, "ppo.checkpoint_every=1"]


def _upstream(kind: str, root: Path) -> dict[str, Path]:
    cfg = load_config(None, [*FAST, f"adapter.kind={kind}"])
    execute("sft", train_sft, cfg, root / "sft", {})
    execute("reward", train_reward, cfg, root / "reward", {})
    return {"sft": root / "sft", "reward": root / "reward"}


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _upstream("lora", tmp_path_factory.mktemp("lora"))


@pytest.mark.parametrize("kind", ["lora", "qlora", "ptuning_v2"])
def test_ppo_runs_for_every_kind(kind: str, tmp_path: Path) -> None:
    inputs = _upstream(kind, tmp_path)
    cfg = load_config(None, [*FAST, f"adapter.kind={kind}"])
    manifest = execute("ppo", train_ppo, cfg, tmp_path / "ppo", inputs)
    metrics = manifest["metrics"]
    assert 0 <= metrics["task_score"] <= 1 and "policy_reward" in metrics and "task_score_sft" in metrics
    assert (tmp_path / "ppo" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "ppo" / "value_head.safetensors").is_file()


def _snapshot(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def test_update_trains_policy_and_value_only_on_one_backbone(lora_inputs: dict[str, Path]) -> None:
    cfg = load_config(None, FAST)
    actors = build_actors(cfg, lora_inputs)
    model = actors.model
    frozen = {name: _snapshot(model, name) for name in (REFERENCE, REWARD)}
    trained = {name: _snapshot(model, name) for name in (POLICY, VALUE)}
    head_before = actors.value_head.weight.detach().clone()
    base_before = weights_digest(model)

    params = [p for p in model.parameters() if p.requires_grad] + list(actors.value_head.parameters())
    got_grad: set[int] = set()
    for p in params:
        p.register_post_accumulate_grad_hook(lambda t: got_grad.add(id(t)) if t.grad.abs().sum() > 0 else None)
    rollout, _ = collect_rollout(actors, ["3+4=", "12+9=", "5+5=", "7+1="], cfg, kl_coef=0.1, seed=0)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ppo_update(actors, rollout, optimizer, params, cfg, torch.Generator().manual_seed(0))

    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names.get(id(p), "value_head") for p in params if id(p) not in got_grad]
    assert not missing, f"no gradient reached {missing[:5]}"
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {POLICY, VALUE}
    for name, before in frozen.items():
        after = _snapshot(model, name)
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} adapter changed"
    for name, before in trained.items():
        after = _snapshot(model, name)
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} adapter did not train"
    assert not torch.equal(head_before, actors.value_head.weight)
    assert weights_digest(model) == base_before

    # One copy of the base: the unique storages behind the base weights hold exactly one backbone.
    unique = {t.untyped_storage().data_ptr(): t.numel() for t in base_parameters(model).values()}
    single = load_backbone(cfg.backbone).model
    single_unique = {t.untyped_storage().data_ptr(): t.numel() for t in base_parameters(single).values()}
    assert sum(unique.values()) == sum(single_unique.values())
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters == 4 * sum(v.numel() for v in _snapshot(model, POLICY).values())


def test_killed_ppo_resumes_from_its_last_checkpoint(lora_inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    sets = [*FAST, "ppo.updates=40", "ppo.checkpoint_every=2"]
    command = [sys.executable, "-m", "stages.ppo", "--out", str(out), f"--input=sft={lora_inputs['sft']}",
               f"--input=reward={lora_inputs['reward']}", *[a for s in sets for a in ("--set", s)]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = out.parent / ".ppo.checkpoints"
    deadline = time.time() + 300
    while not any(artifacts.is_finished(p) for p in checkpoints.glob("update-*")):
        assert process.poll() is None and time.time() < deadline, "PPO ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # a hard kill, as an OOM killer or a preemption would
    process.wait()
    assert not artifacts.is_finished(out)
    saved = max(artifacts.read_manifest(p)["update"] for p in checkpoints.glob("update-*") if artifacts.is_finished(p))

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"ppo: resuming from update {saved}" in rerun.stdout + rerun.stderr
    manifest = artifacts.read_manifest(out)
    assert manifest["metrics"]["resumed_from_update"] == saved >= 2
    assert [row["update"] for row in json.loads((out / "history.json").read_text())] == list(range(1, 41))
