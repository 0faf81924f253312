"""The pages for scheduled runs (issue 32), read in a real browser: a champion, a scheduled run that regresses
against it (not promoted, and every page says why) and a failed run; `rlhf dashboard` shows them over time
with the champion marked and compares two runs in its picker; `rlhf diff` prints the same comparison;
`report.html` shows metrics with units and meanings, the gate's decision, samples and links. Headless
Chromium renders each page (its DOM after the script ran, and a screenshot)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flows.glossary import meaning
from tests.conftest import TINY, run_cli

# A seed of its own: its stages train here (a stage from another test's cache has no log in this run).
SFT_ONLY = [*TINY, "run.stages=[sft]", "tracking.backend=none", "run.seed=23"]
GATE = 'gate.conditions=["sft.final_loss <= champion + 0.001", "sft.task_score >= 0"]'


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("RLHF_REQUIRE_BROWSER"):  # CI installs it (.ci/run): a missing browser fails there
            pytest.fail("headless Chromium is required: apt-get install chromium")
        pytest.skip("needs headless Chromium (apt-get install chromium); CI runs it")
    return found


def browse(page: Path, fragment: str = "", screenshot: Path | None = None) -> str:
    """The page's DOM after its script ran, from headless Chromium; with ``screenshot``, also a PNG of it."""
    url = page.resolve().as_uri() + fragment
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,2400"]
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    if screenshot is not None:
        subprocess.run(
            [_chromium(), *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True
        )
        _assert_drawn(screenshot)
    return dom


def _assert_drawn(png: Path) -> None:
    """A real picture: a PNG of the window's size with text and plots on it, not one blank colour."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    assert pixels.shape[:2] == (2400, 1400), pixels.shape
    assert pixels.std() > 0.05 and (pixels[..., :3] < 0.3).mean() > 0.002  # dark text on a light page


def _text(dom: str) -> str:
    """The page's visible words, tags removed and spaces collapsed (to assert what a reader sees)."""
    import html

    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<script.*?</script>", "", dom))).split())


def test_dashboard_diff_and_report_over_a_champion_a_regressing_and_a_failed_run(tmp_path: Path) -> None:
    from flows.pipeline import scheduled_run
    from stages.io.config import BackboneSection, load_config
    from stages.model.backbone import resolve_backbone

    runs = tmp_path / "runs"
    champion = run_cli("run", "--run-id", "champion", "--runs-dir", str(runs), *_sets(*SFT_ONLY, GATE), cwd=tmp_path)
    assert champion.returncode == 0, champion.stderr[-2000:]
    tonight = Path(scheduled_run(overrides=[*SFT_ONLY, "sft.learning_rate=1e-7", GATE], runs_dir=str(runs))).name
    broken = tmp_path / "broken-backbone"  # passes the pre-flight, fails inside the stage
    shutil.copytree(resolve_backbone(BackboneSection()), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    failed = run_cli(
        "run", "--run-id", "failed", "--runs-dir", str(runs), *_sets(*SFT_ONLY, f"backbone.name={broken}"), cwd=tmp_path
    )
    assert failed.returncode == 1 and f"runs:    {runs / 'dashboard.html'}" in failed.stdout  # rebuilt after it

    learning_rate = json.dumps(load_config(None, SFT_ONLY).sft.learning_rate)  # the champion's
    ours = json.loads((runs / tonight / "sft" / "manifest.json").read_text())["metrics"]["final_loss"]
    theirs = json.loads((runs / "champion" / "sft" / "manifest.json").read_text())["metrics"]["final_loss"]
    why = (
        f"not promoted: failed sft.final_loss <= champion + 0.001 (was {ours:.4g}; champion champion had {theirs:.4g})"
    )

    # The dashboard, with the champion chosen against tonight's run in its picker.
    built = run_cli("dashboard", "--runs-dir", str(runs), cwd=tmp_path)
    assert built.returncode == 0 and built.stdout.strip() == f"dashboard: {runs / 'dashboard.html'}"
    dom = browse(runs / "dashboard.html", f"#a=champion&b={tonight}", tmp_path / "dashboard.png")
    seen = _text(dom)
    assert "champion: champion" in seen and "champion ★ champion" in seen
    rows = seen[seen.index("runs run started (UTC)") :]
    assert rows.index("failed") < rows.index(tonight) < rows.index("champion ★")  # newest first
    assert (
        f"{tonight} " in rows and why in rows and re.search(r"failed \S+ \S+ failed sft failed: stage sft failed", rows)
    )
    assert dom.count("<img") >= 2 and "sft.final_loss" in seen  # the trends: the gate's metric first
    picked = seen[seen.index("compare two runs") :]
    assert "A champion (completed, promoted by its gate" in picked and f"B {tonight} (completed, {why})" in picked
    assert f"sft.final_loss {theirs:.4g} {ours:.4g} +{ours - theirs:.4g}" in picked
    assert f"sft.learning_rate {learning_rate} 1e-07" in picked
    assert "sft.backbone_fingerprint same" in picked and "sft.config_digest DIFFERENT" in picked
    assert "sft.dataset_digest same" in picked
    assert "final samples" in picked and "says" in picked

    # rlhf diff: the same comparison, as JSON and as text.
    diff = json.loads(run_cli("diff", "champion", tonight, "--runs-dir", str(runs), "--json", cwd=tmp_path).stdout)
    assert diff["a"]["run_id"] == "champion" and diff["b"]["promotion"] == why
    loss = next(r for r in diff["metrics"] if (r["stage"], r["metric"]) == ("sft", "final_loss"))
    assert (loss["a"], loss["b"]) == (theirs, ours) and loss["change"] == pytest.approx(ours - theirs)
    assert [r for r in diff["config"] if r["key"] == "sft.learning_rate"][0]["b"] == "1e-07"
    assert {r["key"] for r in diff["config"]} == {"sft.learning_rate"}  # the gates are the same
    same = {(r["stage"], r["digest"]): r["same"] for r in diff["digests"]}
    assert same[("sft", "backbone_fingerprint")] and same[("sft", "dataset_digest")]
    assert not same[("sft", "config_digest")] and not same[("sft", "cache_key")]
    assert len(diff["samples"]["sft"]) == 4 and all(r["a"] and r["b"] for r in diff["samples"]["sft"])
    text = run_cli("diff", "champion", tonight, "--runs-dir", str(runs), cwd=tmp_path).stdout
    assert f"sft.learning_rate: {learning_rate} -> 1e-07" in text
    assert "sft.config_digest" in text and "DIFFERENT" in text and "sft: final samples (A | B)" in text
    bad = run_cli("diff", "champion", "nope", "--runs-dir", str(runs), cwd=tmp_path)
    assert bad.returncode == 2 and "nope: no such run" in bad.stderr

    # Tonight's report: the decision and its conditions, metrics with units and meanings, samples, links.
    dom = browse(runs / tonight / "report.html", screenshot=tmp_path / "report.png")
    seen = _text(dom)
    assert why in seen
    assert f"sft.final_loss <= champion + 0.001 {ours:.4g} {theirs:.4g} (champion)" in seen and " FAIL " in seen
    assert "sft.task_score >= 0 0 0 pass" in seen
    final_loss = meaning("sft", "final_loss")
    assert f"final_loss {ours:.4g} {final_loss.unit} {final_loss.text}" in seen
    assert "what the model says base model, before training" in seen and "final evaluation (after step 3)" in seen
    prompts = [json.loads(line)["prompt"] for line in (runs / tonight / "sft" / "samples.jsonl").open()]
    assert all(p in seen for p in prompts)
    assert 'href="logs/sft.log"' in dom and 'href="sft/samples.jsonl"' in dom
    assert (runs / tonight / "logs" / "sft.log").is_file()


def test_one_unreadable_run_folder_does_not_hide_the_others_and_no_text_escapes_its_place(tmp_path: Path) -> None:
    """A run folder whose config no longer loads is named on the page, the others are drawn; a run id with a
    quote or a hash is quoted in its link; a response holding '<!--<script' or '</script>' stays inside the
    embedded JSON (every '<' escaped), which still parses back to the same text."""
    from flows.dashboard import _picker, _report_link, write_dashboard
    from tests.test_promotion import _finished_run

    runs = tmp_path / "runs"
    _finished_run(runs, "good", {"sft": {"task_score": 0.5}}, promoted=True)
    (runs / "stale").mkdir()
    (runs / "stale" / "config.yaml").write_text("sft: {no_such_key: 1}\n")
    page = write_dashboard(runs).read_text()
    assert "not shown, unreadable: stale: " in page and "no_such_key" in page
    assert "<a href='good/report.html'>good</a> <b title='the champion'>" in page

    assert _report_link("it's#1") == "<a href='it%27s%231/report.html'>it&#x27;s#1</a>"
    said = "<!--<script>alert(1)</script>"
    summary = {"run_id": "r", "promotion": None, "finished": True, "stages": {"sft": {"samples": [{"response": said}]}}}
    picker = _picker([summary])
    data = picker[picker.index("application/json'>") + len("application/json'>") : picker.index("</script>")]
    assert "<" not in data and json.loads(data)["r"]["stages"]["sft"]["samples"][0]["response"] == said
