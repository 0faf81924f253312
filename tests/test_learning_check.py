"""A stage that learns nothing is not silent: the warning reaches the log, the metrics and both reports."""

import json
from pathlib import Path

import pytest
import torch

from stages.training.learning_check import LearningCheck
from tests.conftest import TINY, run_cli


def _rows(losses: list[float]) -> list[dict]:
    return [{"step": step, "loss": loss} for step, loss in enumerate(losses, start=1)]


def test_untouched_weights_are_reported_and_trained_ones_are_not() -> None:
    module = torch.nn.Linear(3, 2)
    check = LearningCheck(module, stage="reward")
    assert "bit-identical" in check.warnings([])[0]
    module(torch.ones(1, 3)).sum().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert check.changed_parameters() == 2 and check.warnings([]) == []


def test_a_frozen_module_is_reported() -> None:
    frozen = torch.nn.Linear(3, 2).requires_grad_(False)
    assert "no trainable parameters" in LearningCheck(frozen, stage="sft").warnings([])[0]


def test_a_loss_that_never_moves_after_warmup_is_reported() -> None:
    module = torch.nn.Linear(3, 2)
    check = LearningCheck(module, stage="rrhf")
    with torch.no_grad():
        module.weight.add_(1.0)  # weights moved, loss did not
    flat = [9.0, 5.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # two warm-up steps, then flat
    assert check.warnings(_rows(flat), warmup_steps=2) == [
        "rrhf: the training loss has not moved after the warm-up (2 -> 2): nothing was learned"
    ]
    assert check.warnings(_rows([2.0, 1.9, 1.7, 1.2, 0.9, 0.6])) == []
    assert check.warnings(_rows(flat[:7]), warmup_steps=2) == []  # too few values to judge
    assert check.warnings(_rows([0.0] * 8)) == []  # a loss already at 0 has nothing left to move


def test_a_prefix_at_a_lora_learning_rate_is_reported_at_once_and_at_the_end(capsys: pytest.CaptureFixture) -> None:
    module = torch.nn.Linear(3, 2)
    check = LearningCheck(module, stage="sft", adapter_kind="ptuning_v2", learning_rate=0.002)
    assert "adapter.kind=ptuning_v2 at sft.learning_rate=0.002: a prefix needs about 0.05" in capsys.readouterr().out
    module(torch.ones(1, 3)).sum().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert [w.split(":")[1] for w in check.warnings([])] == [" adapter.kind=ptuning_v2 at sft.learning_rate=0.002"]
    assert LearningCheck(module, stage="sft", adapter_kind="ptuning_v2", learning_rate=0.1).rate_warning is None
    assert LearningCheck(module, stage="sft", adapter_kind="lora", learning_rate=0.002).rate_warning is None


def test_a_run_at_learning_rate_zero_publishes_with_a_loud_warning(tmp_path: Path) -> None:
    sets = [*TINY, "run.stages=[sft,reward]", "sft.learning_rate=0", "reward.learning_rate=0", "tracking.backend=none"]
    result = run_cli("run", "--run-id", "lr0", *(a for s in sets for a in ("--set", s)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for stage in ("sft", "reward"):
        assert f"WARNING: {stage}: the trainable parameters are bit-identical" in log
        manifest = json.loads((tmp_path / "runs" / "lr0" / stage / "manifest.json").read_text())
        assert any("bit-identical" in w for w in manifest["metrics"]["warnings"])
    report = run_cli("report", "lr0", cwd=tmp_path)
    assert report.returncode == 0 and report.stdout.count("WARNING: ") == 2, report.stdout
    assert (tmp_path / "runs" / "lr0" / "report.html").read_text().count("class='warning'") == 2
