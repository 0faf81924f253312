"""Promotion gates: a run that passes its gate is promoted, one that fails it finishes unpromoted with
the failed conditions named; `rlhf promote` records a person's approval; `runs/promoted.json` always names
the latest promoted run; a scheduled run promotes only through its gate."""

import json
from pathlib import Path

import pytest

from flows.promotion import LATEST, apply_gate, promote, promoted_runs, refresh_latest
from flows.report import describe
from flows.run_dir import PROMOTION, read_promotion
from stages.io.config import ConfigError
from stages.io.gate import Condition
from tests.conftest import TINY, run_cli

SFT_ONLY = [*TINY, "run.stages=[sft]", "tracking.backend=none"]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_conditions_check_final_metrics_and_name_what_is_missing() -> None:
    metrics = {"ppo": {"task_score": 0.75, "kl_to_reference": 1.5, "warnings": []}}
    assert Condition.parse("ppo.task_score >= 0.8").check(metrics) == {
        "condition": "ppo.task_score >= 0.8",
        "value": 0.75,
        "passed": False,
    }
    assert Condition.parse("ppo.kl_to_reference<=2").check(metrics)["passed"]
    missing = Condition.parse("ppo.final_kl <= 2.0").check(metrics)
    assert (
        not missing["passed"]
        and missing["reason"] == "ppo has no numeric metric 'final_kl'; it has kl_to_reference, task_score"
    )
    assert Condition.parse("reward.pair_accuracy >= 0.9").check(metrics)["reason"] == "reward has no finished metrics"
    for bad in ("ppo.task_score => 0.8", "task_score >= 0.8", "ppo.task_score >= high"):
        with pytest.raises(ValueError, match="expected STAGE.METRIC OP NUMBER"):
            Condition.parse(bad)


def test_a_threshold_or_metric_that_is_not_finite_decides_nothing() -> None:
    """Issue 29, fault 7: 'sft.task_score != nan' passed validation and promoted a run whose task_score was
    0.0 (NaN is unequal to everything), and '>= nan' could never pass. Now such a threshold is a config
    error naming the condition, and a NaN metric fails any condition with the reason."""
    from stages.io.config import ConfigError, load_config

    for bad in (
        "sft.task_score != nan",
        "sft.task_score >= NaN",
        "ppo.kl_to_reference <= inf",
        "sft.task_score > -inf",
    ):
        with pytest.raises(ValueError, match="is not a finite number"):
            Condition.parse(bad)
    with pytest.raises(ConfigError, match=r"'sft.task_score != nan': the threshold nan is not a finite number"):
        load_config(None, ["run.stages=[sft]", 'gate.conditions=["sft.task_score != nan"]'])
    diverged = Condition.parse("sft.train_loss != 1.0").check({"sft": {"train_loss": float("nan")}})
    assert diverged == {
        "condition": "sft.train_loss != 1.0",
        "value": None,
        "passed": False,
        "reason": "sft.train_loss is nan, not a finite number",
    }


def test_gate_promotes_or_not_and_a_person_can_promote(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    passing = run_cli(
        "run",
        "--run-id",
        "good",
        "--runs-dir",
        str(runs),
        *_sets(*SFT_ONLY, 'gate.conditions=["sft.task_score >= 0", "sft.train_loss < 100"]'),
        cwd=tmp_path,
    )
    assert passing.returncode == 0, passing.stderr[-2000:]
    assert "promotion: promoted by its gate (all 2 conditions passed)" in passing.stdout
    assert json.loads((runs / LATEST).read_text())["run_id"] == "good"

    # Same stages (from the cache), a gate it cannot pass: the run still finishes, exit 0, not promoted.
    failing = run_cli(
        "run",
        "--run-id",
        "bad",
        "--runs-dir",
        str(runs),
        *_sets(*SFT_ONLY, 'gate.conditions=["sft.task_score >= 2", "sft.final_kl <= 2.0"]'),
        cwd=tmp_path,
    )
    assert failing.returncode == 0, failing.stderr[-2000:]
    assert "not promoted: failed sft.task_score >= 2 (was " in failing.stdout
    assert "sft.final_kl <= 2.0 (sft has no numeric metric 'final_kl'" in failing.stdout
    assert (runs / "bad" / "sft" / "adapter" / "adapter_config.json").is_file()  # its artifacts stay
    report = json.loads(run_cli("report", "bad", "--runs-dir", str(runs), "--json", cwd=tmp_path).stdout)
    assert report["promotion"]["status"] == "not promoted"
    assert report["promotion"]["failed"] == ["sft.task_score >= 2", "sft.final_kl <= 2.0"]
    assert "promotion: not promoted: failed" in run_cli("report", "bad", "--runs-dir", str(runs), cwd=tmp_path).stdout
    assert "not promoted: failed sft.task_score &gt;= 2" in (runs / "bad" / "report.html").read_text()
    assert json.loads((runs / LATEST).read_text())["run_id"] == "good"  # still the latest promoted

    listed = run_cli("runs", "--runs-dir", str(runs), cwd=tmp_path).stdout
    assert any(line.split()[:3] == ["good", "completed", "promoted"] for line in listed.splitlines())
    assert any(line.split()[:4] == ["bad", "completed", "not", "promoted"] for line in listed.splitlines())

    approved = run_cli(
        "promote", "bad", "--by", "alice", "--reason", "gate too strict", "--runs-dir", str(runs), cwd=tmp_path
    )
    assert approved.returncode == 0, approved.stderr[-2000:]
    assert "promoted by alice" in approved.stdout and "over its gate: not promoted" in approved.stdout
    record = json.loads((runs / "bad" / PROMOTION).read_text())
    assert (record["status"], record["by"], record["approved_by"], record["reason"]) == (
        "promoted",
        "manual",
        "alice",
        "gate too strict",
    )
    assert record["gate"]["status"] == "not promoted" and record["at"]
    assert json.loads((runs / LATEST).read_text()) == {
        "run_id": "bad",
        "at": record["at"],
        "by": "manual",
        "approved_by": "alice",
    }
    promoted = run_cli("runs", "--promoted", "--runs-dir", str(runs), cwd=tmp_path).stdout.splitlines()
    assert [line.split()[0] for line in promoted[1:3]] == ["good", "bad"] and "alice (by hand)" in promoted[2]
    assert promoted[-1].startswith("latest: bad")

    # Finishing the run again without training anything keeps the approval (and re-checks the gate).
    resumed = run_cli("resume", "bad", "--runs-dir", str(runs), cwd=tmp_path)
    assert resumed.returncode == 0 and "promoted by alice" in resumed.stdout
    # Other weights void it: the gate decides again, and promoted.json goes back to the gate's run.
    retrained = run_cli(
        "stage", "sft", "--run", "bad", "--set", "sft.learning_rate=0.001", "--runs-dir", str(runs), cwd=tmp_path
    )
    assert retrained.returncode == 0 and "promotion: not promoted: failed" in retrained.stdout
    assert json.loads((runs / LATEST).read_text())["run_id"] == "good"


def test_only_a_finished_run_can_be_promoted(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "half"
    run_dir.mkdir(parents=True)
    from stages.io.config import load_config

    (run_dir / "config.yaml").write_text(load_config(None, SFT_ONLY).to_yaml())
    with pytest.raises(ConfigError, match="run half: sft did not finish; only a finished run can be promoted"):
        promote(run_dir, "alice")
    assert apply_gate(run_dir, []) is None  # no gate: no decision, never promoted on its own
    assert not (run_dir / PROMOTION).exists() and not (tmp_path / "runs" / LATEST).exists()


def test_an_approval_is_void_once_a_stage_holds_other_files_under_the_same_cache_key(tmp_path: Path) -> None:
    """``--force`` retrains under the same cache key; on a GPU or over DeepSpeed ranks the new weights
    differ. The approval was of the files, so it must not carry over to them."""
    from flows.run_dir import record_status
    from stages.io import artifacts
    from stages.io.config import load_config

    run_dir = tmp_path / "runs" / "forced"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(load_config(None, SFT_ONLY).to_yaml())

    def train_sft(weights: bytes) -> None:  # what a finished stage publishes, under one cache key
        with artifacts.staging(run_dir / "sft") as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(weights)
            artifacts.publish(tmp, run_dir / "sft", {"cache_key": "k" * 64, "metrics": {"task_score": 0.5}})
        record_status(run_dir, "sft", status="completed")

    train_sft(b"first weights")
    promote(run_dir, "alice")
    assert apply_gate(run_dir, [])["approved_by"] == "alice"  # the same files: the approval stands
    assert json.loads((tmp_path / "runs" / LATEST).read_text())["run_id"] == "forced"

    # A rerun that fails (what flows.pipeline does then): the approval is on hold, not the latest promoted.
    record_status(run_dir, "sft", status="failed", error="stage sft failed")
    refresh_latest(tmp_path / "runs")
    assert promoted_runs(tmp_path / "runs") == [] and not (tmp_path / "runs" / LATEST).exists()
    assert describe(read_promotion(run_dir), finished=False).endswith(
        "on hold: a stage has not finished (`rlhf resume` finishes it)"
    )
    record_status(run_dir, "sft", status="completed")  # finished again with the same files: it counts again
    refresh_latest(tmp_path / "runs")
    assert [row["run_id"] for row in promoted_runs(tmp_path / "runs")] == ["forced"]
    train_sft(b"other weights")
    assert apply_gate(run_dir, []) is None and not (run_dir / PROMOTION).exists()
    assert not (tmp_path / "runs" / LATEST).exists()


def test_a_scheduled_run_promotes_only_through_its_gate(tmp_path: Path) -> None:
    """What `rlhf serve` triggers (flows.pipeline.scheduled_run), run in-process: with no gate nothing is
    promoted, with a gate it decides, and the verdict is a Prefect artifact of the flow run."""
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import scheduled_run

    runs = tmp_path / "runs"
    ungated = Path(scheduled_run(overrides=SFT_ONLY, runs_dir=str(runs)))
    assert (
        json.loads(run_cli("report", ungated.name, "--runs-dir", str(runs), "--json", cwd=tmp_path).stdout)["promotion"]
        is None
    )
    assert not (runs / LATEST).exists()

    gated = Path(scheduled_run(overrides=[*SFT_ONLY, 'gate.conditions=["sft.task_score >= 0"]'], runs_dir=str(runs)))
    assert json.loads((gated / PROMOTION).read_text())["by"] == "gate"
    assert json.loads((runs / LATEST).read_text())["run_id"] == gated.name

    async def latest_verdict() -> str:
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            return next(a.description for a in found if a.key == "promotion")

    assert asyncio.run(latest_verdict()) == f"run {gated.name}: promoted by its gate (all 1 conditions passed)"
