"""End to end through the real ``rlhf`` CLI: Prefect flow, stage processes, cache, report."""

import json
import subprocess
import sys
from pathlib import Path

from stages import artifacts
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


def test_run_twice_second_is_cached_and_report_is_machine_readable(tmp_path: Path) -> None:
    first = run_cli("run", *SETS, "--run-id", "first", "--runs-dir", "runs", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads(run_cli("report", "first", "--json", cwd=tmp_path).stdout)
    sft = report["stages"]["sft"]
    assert report["run_id"] == "first" and sft["status"] == "completed"
    assert 0.0 <= sft["metrics"]["task_score"] <= 1.0 and "task_score_before" in sft["metrics"]
    manifest = artifacts.read_manifest(Path(sft["artifact"]))
    for field in ("config_digest", "input_digests", "backbone_fingerprint", "dataset_digest", "code_version",
                  "cache_key", "metrics", "seconds"):
        assert field in manifest, field
    assert (Path(sft["artifact"]) / "adapter" / "adapter_config.json").is_file()

    second = run_cli("run", *SETS, "--run-id", "second", "--runs-dir", "runs", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    cached = json.loads(run_cli("report", "second", "--json", cwd=tmp_path).stdout)["stages"]["sft"]
    assert cached["status"] == "cached"
    assert not (tmp_path / "runs" / "second" / "logs" / "sft.log").exists(), "a cached stage must not train"
    assert artifacts.artifact_digest(Path(cached["artifact"])) == manifest["artifact_digest"]
    assert cached["metrics"] == sft["metrics"]

    forced = run_cli("run", *SETS, "--run-id", "third", "--runs-dir", "runs", "--force", "sft", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads(run_cli("report", "third", "--json", cwd=tmp_path).stdout)["stages"]["sft"]["status"] == "completed"


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
    assert f"{data}: line 2: missing key(s) ['completion']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), "bad data must fail before any run folder is written"


def test_failing_stage_is_reported_failed_with_its_error(tmp_path: Path) -> None:
    # Data that passes the pre-flight check but cannot train: a prompt longer than max_length.
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+" * 200 + "1=", "completion": "201"}) + "\n")
    result = run_cli("run", *SETS, "--set", f"data.sft={data}", "--set", "sft.max_length=8",
                     "--run-id", "fails", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error: " in result.stderr and "stage sft failed" in result.stderr
    run_dir = tmp_path / "runs" / "fails"
    assert not (run_dir / "sft").exists() and not [p for p in run_dir.iterdir() if p.name.startswith(".sft")]
    report = json.loads(run_cli("report", "fails", "--json", cwd=tmp_path).stdout)
    assert report["stages"]["sft"]["status"] == "failed" and "stage sft failed" in report["stages"]["sft"]["error"]


def test_stage_runs_alone_as_a_module(tmp_path: Path) -> None:
    out = tmp_path / "sft"
    result = subprocess.run(
        [sys.executable, "-m", "stages.sft", "--out", str(out), *SETS, "--set", "adapter.kind=ptuning_v2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = artifacts.read_manifest(out)
    assert manifest["stage"] == "sft" and manifest["metrics"]["adapter_kind"] == "ptuning_v2"
    assert manifest["artifact_digest"] == artifacts.tree_digest(out)
