"""A stage that learns nothing is not silent: the warning reaches the log, the metrics and both reports."""

import json
from pathlib import Path

import torch

from stages.learning_check import LearningCheck
from tests.conftest import TINY, run_cli


def test_untouched_weights_are_reported_and_trained_ones_are_not() -> None:
    module = torch.nn.Linear(3, 2)
    check = LearningCheck(module)
    assert "bit-identical" in check.warnings("reward", [])[0]
    torch.optim.SGD(module.parameters(), lr=0.1).zero_grad()
    module(torch.ones(1, 3)).sum().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert check.changed_parameters() == 2 and check.warnings("reward", []) == []


def test_a_frozen_module_is_reported() -> None:
    assert "no trainable parameters" in LearningCheck(torch.nn.Linear(3, 2).requires_grad_(False)).warnings("sft", [])[0]


def test_a_loss_that_never_moves_after_warmup_is_reported() -> None:
    module = torch.nn.Linear(3, 2)
    check = LearningCheck(module)
    with torch.no_grad():
        module.weight.add_(1.0)  # weights moved, loss did not
    flat = [9.0, 5.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # two warm-up values, then flat
    assert check.warnings("rrhf", flat, warmup_logged=2) == ["rrhf: the training loss has not moved after the "
                                                             "warm-up (2 -> 2): nothing was learned"]
    assert check.warnings("rrhf", [2.0, 1.9, 1.7, 1.2, 0.9, 0.6], warmup_logged=0) == []
    assert check.warnings("rrhf", flat[:5], warmup_logged=2) == []  # too few values to judge


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
