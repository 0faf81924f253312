"""End to end through the real ``rlhf`` CLI: Prefect flow, stage processes, cache, report."""

import json
import os
import subprocess
import sys
from pathlib import Path

from stages.io import artifacts
from tests.conftest import TINY, run_cli

SETS = [arg for item in TINY for arg in ("--set", item)]


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\nfrom flows import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'prefect', 'deepspeed', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def _token_tables(home: Path) -> dict[str, tuple[int, int]]:
    """Every token table in the dataset store: its path and (inode, modification time)."""
    return {str(p.relative_to(home)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in home.glob("datasets/*/tokens-*")}


def test_run_twice_second_is_cached_and_report_is_machine_readable(tmp_path: Path) -> None:
    home = tmp_path / "home"  # a dataset store of its own, sharing only the backbone build
    home.mkdir()
    (home / "backbones").symlink_to(Path(os.environ["RLHF_HOME"]) / "backbones", target_is_directory=True)
    env = {"RLHF_HOME": str(home)}
    first = run_cli("run", *SETS, "--run-id", "first", "--runs-dir", "runs", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads(run_cli("report", "first", "--json", cwd=tmp_path).stdout)
    sft = report["stages"]["sft"]
    assert report["run_id"] == "first" and sft["status"] == "completed"
    manifest = artifacts.read_manifest(Path(sft["artifact"]))
    assert sft["metrics"] == manifest["metrics"] and "task_score_before" in sft["metrics"]  # the report's source
    for field in (
        "config_digest",
        "input_digests",
        "backbone_fingerprint",
        "dataset_digest",
        "code_version",
        "cache_key",
        "metrics",
        "seconds",
    ):
        assert field in manifest, field
    assert (Path(sft["artifact"]) / "adapter" / "adapter_config.json").is_file()

    _check_wandb_offline_runs(tmp_path / "runs" / "first")

    # Each dataset was tokenized once, by the first stage that read it: SFT's demonstrations, the eval prompts,
    # the reward model's pairs; PPO read them from the store.
    tokenized = _token_tables(home)
    assert len(tokenized) == 3, tokenized

    second = run_cli("run", *SETS, "--run-id", "second", "--runs-dir", "runs", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    cached = json.loads(run_cli("report", "second", "--json", cwd=tmp_path).stdout)["stages"]["sft"]
    assert cached["status"] == "cached"
    assert not (tmp_path / "runs" / "second" / "logs" / "sft.log").exists(), "a cached stage must not train"
    assert artifacts.artifact_digest(Path(cached["artifact"])) == manifest["artifact_digest"]
    assert cached["metrics"] == sft["metrics"]

    forced = run_cli(
        "run", *SETS, "--run-id", "third", "--runs-dir", "runs", "--force", "reward", cwd=tmp_path, env=env
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    stages = json.loads(run_cli("report", "third", "--json", cwd=tmp_path).stdout)["stages"]
    # a forced stage recomputes what follows it, and nothing before it
    assert [stages[s]["status"] for s in ("sft", "reward", "ppo")] == ["cached", "completed", "completed"]
    assert _token_tables(home) == tokenized, "a stage tokenized a dataset the store already held"


def test_dpo_and_grpo_have_the_entries_of_every_stage(tmp_path: Path) -> None:
    """Both new stages in one chain beside PPO: `rlhf plan` sizes them, the report plots their curves and
    holds their metrics, and each has its own finished W&B run with its curves."""
    sets = [*SETS, "--set", "run.stages=[sft,reward,dpo,grpo]"]
    plan = run_cli("plan", *sets, cwd=tmp_path)
    assert plan.returncode == 0 and {"dpo", "grpo"} <= {line.split()[0] for line in plan.stdout.splitlines() if line}
    run = run_cli("run", *sets, "--run-id", "both", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stages = json.loads(run_cli("report", "both", "--json", cwd=tmp_path).stdout)["stages"]
    assert {"kl_to_reference", "reward_accuracy"} <= set(stages["dpo"]["metrics"])
    assert {"kl_to_reference", "policy_reward", "task_score_sft"} <= set(stages["grpo"]["metrics"])
    html = (tmp_path / "runs" / "both" / "report.html").read_text()
    assert "DPO loss" in html and "GRPO reward (mean of the sampled groups)" in html
    seen = _check_wandb_offline_runs(tmp_path / "runs" / "both", {"dpo", "grpo"})  # SFT, reward: maybe cached
    assert "train/loss" in seen["dpo"]["summary"] and "reward_accuracy" in seen["dpo"]["summary"]  # HF reporting
    assert "grpo/reward" in seen["grpo"]["summary"] and "grpo/kl" in seen["grpo"]["summary"]


def _check_wandb_offline_runs(run_dir: Path, stages: set[str] | None = None) -> dict[str, dict]:
    """Read every stage's offline W&B run back with `wandb leet inspect`: group, job type, metrics, lineage.
    Without ``stages``: the default chain's checks; with them, only that each of them has one finished run
    (a stage served from the cache, as another test's SFT may be, tracks nothing)."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    seen = {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        records = subprocess.run(
            [str(wandb_cli), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        run = next(json.loads(line)["run"] for line in records if '"type":"run"' in line)
        summary = json.loads(
            subprocess.run(
                [str(wandb_cli), "leet", "inspect", "--summary", "--json", str(folder)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert run["run_group"] == run_dir.name and summary["state"] == "finished"
        assert run["job_type"] not in seen  # one run per stage
        seen[run["job_type"]] = summary
    if stages is not None:
        assert stages <= set(seen), seen.keys()
        return seen
    assert set(seen) == {"sft", "reward", "ppo"}
    assert "task_score" in seen["sft"]["summary"] and "train/loss" in seen["sft"]["summary"]  # HF reporting
    assert "pair_accuracy" in seen["reward"]["summary"] and "reward/loss" in seen["reward"]["summary"]
    assert "ppo/score" in seen["ppo"]["summary"] and "task_score" in seen["ppo"]["summary"]
    lineage = seen["ppo"]["config"]["lineage"]
    assert lineage["sft"] == f"{run_dir.name}-sft-adapter:latest" and lineage["reward"].endswith(
        "-reward-adapter:latest"
    )
    return seen


def test_ppo_only_change_reuses_upstream_and_stage_rerun(tmp_path: Path) -> None:
    assert run_cli("run", *SETS, "--run-id", "base", cwd=tmp_path).returncode == 0
    changed = run_cli(
        "run",
        *SETS,
        "--set",
        "ppo.learning_rate=0.0001",
        "--set",
        "tracking.backend=none",
        "--run-id",
        "lr",
        cwd=tmp_path,
    )
    assert changed.returncode == 0, changed.stderr[-3000:]
    stages = json.loads(run_cli("report", "lr", "--json", cwd=tmp_path).stdout)["stages"]
    assert [stages[s]["status"] for s in ("sft", "reward", "ppo")] == ["cached", "cached", "completed"]
    assert not (tmp_path / "runs" / "lr" / "wandb").exists(), "tracking.backend=none must write nothing"

    html = (tmp_path / "runs" / "lr" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5  # SFT loss, RM accuracy/loss, PPO reward/KL/entropy, scores
    assert "PPO KL to reference" in html and "held-out task_score per stage" in html

    rerun = run_cli("stage", "ppo", "--run", "base", "--set", "ppo.clip_range=0.1", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stages = json.loads(run_cli("report", "base", "--json", cwd=tmp_path).stdout)["stages"]
    assert [stages[s]["status"] for s in ("sft", "reward", "ppo")] == ["cached", "cached", "completed"]
    assert (tmp_path / "runs" / "base" / "config.1.yaml").is_file()
    assert "clip_range: 0.1" in (tmp_path / "runs" / "base" / "config.yaml").read_text()

    forced = run_cli("stage", "ppo", "--run", "base", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "ppo     completed" in forced.stdout

    listing = run_cli("runs", cwd=tmp_path).stdout
    assert "base" in listing and "lr" in listing and "completed" in listing


def test_bad_config_is_one_clear_error_and_creates_no_run(tmp_path: Path) -> None:
    result = run_cli("run", "--set", "sft.max_stepz=3", "--run-id", "bad", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "sft.max_stepz: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_data_names_the_line_and_leaves_no_artifact(tmp_path: Path) -> None:
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2="}\n')
    result = run_cli("run", *SETS, "--set", f"data.sft={data}", "--run-id", "baddata", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{data}: line 2: fits no sft format" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), "bad data must fail before any run folder is written"


def test_failing_stage_is_reported_failed_with_its_error(tmp_path: Path) -> None:
    # A backbone that passes the pre-flight checks (its config and tokenizer read fine) but whose weights
    # cannot load: the stage fails inside the run.
    import shutil

    from stages.io.config import BackboneSection
    from stages.model.backbone import resolve_backbone

    broken = tmp_path / "broken-backbone"
    shutil.copytree(resolve_backbone(BackboneSection()), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    result = run_cli("run", *SETS, "--set", f"backbone.name={broken}", "--run-id", "fails", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error: " in result.stderr and "stage sft failed" in result.stderr
    run_dir = tmp_path / "runs" / "fails"
    assert not (run_dir / "sft").exists() and not [p for p in run_dir.iterdir() if p.name.startswith(".sft")]
    report = json.loads(run_cli("report", "fails", "--json", cwd=tmp_path).stdout)
    assert report["stages"]["sft"]["status"] == "failed" and "stage sft failed" in report["stages"]["sft"]["error"]


def test_stage_runs_alone_as_a_module(tmp_path: Path) -> None:
    out = tmp_path / "sft"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.training.entry",
            "sft",
            "--out",
            str(out),
            *SETS,
            "--set",
            "adapter.kind=ptuning_v2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = artifacts.read_manifest(out)
    assert manifest["stage"] == "sft" and manifest["metrics"]["adapter_kind"] == "ptuning_v2"
    assert manifest["artifact_digest"] == artifacts.tree_digest(out)
