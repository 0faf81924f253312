"""Promotion gates: a run that passes its gate is promoted, one that fails it finishes unpromoted with
the failed conditions named; `rlhf promote` records a person's approval; `runs/promoted.json` always names
the latest promoted run; a scheduled run promotes only through its gate."""

import json
from pathlib import Path

import pytest

from flows.promotion import LATEST, apply_gate, artifact_digests, promote, promoted_runs, refresh_latest
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
        "threshold": 0.8,
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
        "threshold": 1.0,
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


def test_champion_conditions_parse_and_compare_with_the_champions_value() -> None:
    from stages.io.gate import Champion, ChampionRef

    ours = {"ppo": {"task_score": 0.69}, "reward": {"pair_accuracy": 0.9}}
    champion = Champion("night-1", {"ppo": {"task_score": 0.7}, "reward": {"pair_accuracy": 0.95}})
    margin = Condition.parse("ppo.task_score >= champion - 0.02")
    assert (
        margin.champion == ChampionRef("ppo", "task_score", -0.02)
        and str(margin) == "ppo.task_score >= champion - 0.02"
    )
    assert margin.check(ours, champion) == {
        "condition": "ppo.task_score >= champion - 0.02",
        "value": 0.69,
        "passed": True,
        "champion": {"run_id": "night-1", "value": 0.7},
        "threshold": 0.68,
    }
    assert not Condition.parse("reward.pair_accuracy >= champion").check(ours, champion)["passed"]
    named = Condition.parse("ppo.task_score>=champion.reward.pair_accuracy+0.1")
    assert named.champion == ChampionRef("reward", "pair_accuracy", 0.1)
    assert named.check(ours, champion)["threshold"] == 1.05
    # No champion: not checked (None), with the reason; a champion without the metric: failed, with why.
    assert margin.check(ours) == {
        "condition": "ppo.task_score >= champion - 0.02",
        "value": 0.69,
        "passed": None,
        "reason": "no champion: no promoted run has finished stage ppo, so this is not checked",
    }
    lacking = Condition.parse("ppo.kl_to_reference <= champion").check(
        {"ppo": {"kl_to_reference": 1.0}}, Champion("night-1", {"ppo": {"task_score": 0.7}})
    )
    assert lacking["passed"] is False
    assert lacking["reason"] == "champion night-1: ppo has no numeric metric 'kl_to_reference'; it has task_score"
    # A run equal to its champion passes a condition with no margin (thirds are not exact in binary).
    for op in (">=", "<=", "=="):
        assert Condition.parse(f"ppo.task_score {op} champion").check(
            {"ppo": {"task_score": 2 / 3}}, Champion("night-1", {"ppo": {"task_score": 2 / 3}})
        )["passed"]
    with pytest.raises(ValueError, match="write the margin as an unsigned number"):
        Condition.parse("ppo.task_score >= champion - -0.02")
    for bad in ("ppo.task_score >= champ", "ppo.task_score >= champion * 2", "ppo.task_score >= champion.ppo"):
        with pytest.raises(ValueError, match="expected STAGE.METRIC OP NUMBER or STAGE.METRIC OP champion"):
            Condition.parse(bad)
    with pytest.raises(ValueError, match="the threshold nan is not a finite number"):
        Condition.parse("ppo.task_score >= champion - nan")
    from stages.io.config import load_config

    with pytest.raises(ConfigError, match="names stage 'reward', which is not in run.stages"):
        load_config(None, ["run.stages=[sft]", 'gate.conditions=["sft.task_score >= champion.reward.pair_accuracy"]'])


def _finished_run(runs: Path, run_id: str, metrics: dict[str, dict[str, float]], promoted: bool | None) -> Path:
    """A run folder as the flow leaves it: config, finished stages with these final metrics, status, and
    (promoted True/False) a gate's decision."""
    from flows.run_dir import record_status, write_promotion
    from stages.io import artifacts
    from stages.io.config import load_config

    run_dir = runs / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(load_config(None, [f"run.stages=[{','.join(metrics)}]"]).to_yaml())
    for stage, values in metrics.items():
        with artifacts.staging(run_dir / stage) as tmp:
            artifacts.publish(tmp, run_dir / stage, {"cache_key": "k" * 64, "metrics": values})
        record_status(run_dir, stage, status="completed")
    if promoted is not None:
        status = "promoted" if promoted else "not promoted"
        write_promotion(
            run_dir, {"status": status, "by": "gate", "at": f"2026-12-0{len(list(runs.iterdir()))}", "conditions": []}
        )
    return run_dir


def test_the_champion_is_the_latest_promoted_run_that_finished_the_stage(tmp_path: Path) -> None:
    from flows.promotion import find_champion

    runs = tmp_path / "runs"
    _finished_run(runs, "old", {"sft": {"task_score": 0.5}, "reward": {"pair_accuracy": 0.9}}, promoted=True)
    _finished_run(runs, "sft-only", {"sft": {"task_score": 0.6}}, promoted=True)
    _finished_run(runs, "rejected", {"sft": {"task_score": 0.9}, "reward": {"pair_accuracy": 0.99}}, promoted=False)
    assert find_champion(runs, "sft", exclude="tonight").run_id == "sft-only"
    assert find_champion(runs, "reward", exclude="tonight").run_id == "old"  # the latest one with that stage
    assert find_champion(runs, "sft", exclude="sft-only").run_id == "old"  # never the run being decided
    assert find_champion(runs, "ppo", exclude="tonight") is None

    tonight = _finished_run(runs, "tonight", {"sft": {"task_score": 0.55}, "reward": {"pair_accuracy": 0.95}}, None)
    record = apply_gate(
        tonight, ["sft.task_score >= champion - 0.02", "reward.pair_accuracy >= champion", "sft.task_score >= 0"]
    )
    assert record["status"] == "not promoted" and record["failed"] == ["sft.task_score >= champion - 0.02"]
    assert record["champions"] == {"sft": "sft-only", "reward": "old"}
    assert record["conditions"][0]["champion"] == {"run_id": "sft-only", "value": 0.6}
    assert describe(record) == (
        "not promoted: failed sft.task_score >= champion - 0.02 (was 0.55; champion sft-only had 0.6)"
    )
    assert json.loads((runs / LATEST).read_text())["run_id"] == "sft-only"  # tonight did not replace it

    # A stage no promoted run has: its condition is not checked, and the gate decides by the rest.
    first = _finished_run(runs, "first-dpo", {"sft": {"task_score": 0.7}, "dpo": {"reward_accuracy": 0.4}}, None)
    record = apply_gate(first, ["dpo.reward_accuracy >= champion", "sft.task_score >= champion"])
    assert record["status"] == "promoted" and record["champions"] == {"dpo": None, "sft": "sft-only"}
    assert describe(record) == (
        "promoted by its gate (1 of 2 passed; not checked: dpo.reward_accuracy >= champion "
        "(no champion: no promoted run has finished stage dpo, so this is not checked))"
    )
    assert find_champion(runs, "dpo", exclude="tonight").run_id == "first-dpo"  # now it is the champion

    # Deciding an old promoted run again with the same files and verdict (`rlhf resume`) keeps the time it
    # was promoted: it does not become the latest promoted run, so not the champion.
    old = runs / "sft-only"
    at = read_promotion(old)["at"]
    (old / PROMOTION).write_text(json.dumps({**read_promotion(old), "artifact_digests": artifact_digests(old)}))
    assert apply_gate(old, ["sft.task_score >= 0"])["at"] == at
    assert json.loads((runs / LATEST).read_text())["run_id"] == "first-dpo"


def test_a_scheduled_run_that_regresses_against_the_champion_is_not_promoted(tmp_path: Path) -> None:
    """A promoted run, then what the nightly schedule triggers with a champion-relative gate: a run whose
    SFT barely trained (learning rate 1e-7) ends with a higher final loss than the champion's, so it is not
    promoted, the champion stays the latest promoted run, and its report and Prefect artifact say why."""
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import scheduled_run

    runs = tmp_path / "runs"
    champion = run_cli(
        "run", "--run-id", "champion", "--runs-dir", str(runs),
        *_sets(*SFT_ONLY, 'gate.conditions=["sft.final_loss <= champion", "sft.task_score >= 0"]'),
        cwd=tmp_path,
    )  # fmt: skip
    assert champion.returncode == 0, champion.stderr[-2000:]
    assert (
        "promoted by its gate (1 of 2 passed; not checked: sft.final_loss <= champion (no champion" in champion.stdout
    )

    gate = 'gate.conditions=["sft.final_loss <= champion + 0.001", "sft.task_score >= 0"]'
    tonight = Path(scheduled_run(overrides=[*SFT_ONLY, "sft.learning_rate=1e-7", gate], runs_dir=str(runs)))
    record = json.loads((tonight / PROMOTION).read_text())
    theirs = json.loads((runs / "champion" / "sft" / "manifest.json").read_text())["metrics"]["final_loss"]
    ours = json.loads((tonight / "sft" / "manifest.json").read_text())["metrics"]["final_loss"]
    assert ours > theirs + 0.001, (ours, theirs)
    assert record["status"] == "not promoted" and record["champions"] == {"sft": "champion"}
    assert record["conditions"][0]["champion"] == {"run_id": "champion", "value": theirs}
    assert json.loads((runs / LATEST).read_text())["run_id"] == "champion"
    why = (
        f"not promoted: failed sft.final_loss <= champion + 0.001 (was {ours:.4g}; champion champion had {theirs:.4g})"
    )
    assert why in run_cli("report", tonight.name, "--runs-dir", str(runs), cwd=tmp_path).stdout
    assert why.replace(">", "&gt;").replace("<", "&lt;") in (tonight / "report.html").read_text()

    async def latest_verdict() -> str:
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            return next(a.description for a in found if a.key == "promotion")

    assert asyncio.run(latest_verdict()) == f"run {tonight.name}: {why}"
