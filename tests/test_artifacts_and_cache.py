from pathlib import Path

import pytest

from flows.cache import ArtifactCache
from stages.io import artifacts
from tests.conftest import REPO


def _publish(final: Path, content: str, key: str = "k1") -> Path:
    with artifacts.staging(final) as tmp:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "weights.bin").write_text(content)
        return artifacts.publish(tmp, final, {"cache_key": key})


def test_publish_writes_manifest_with_digest_and_leaves_no_temp(tmp_path: Path) -> None:
    final = _publish(tmp_path / "sft", "abc")
    manifest = artifacts.read_manifest(final)
    assert manifest["artifact_digest"] == artifacts.tree_digest(final)
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]


def test_failure_inside_staging_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "sft"
    with pytest.raises(RuntimeError, match="boom"):
        with artifacts.staging(final) as tmp:
            (tmp / "half-written.bin").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert not artifacts.is_finished(final)


def test_folder_without_manifest_is_not_trusted(tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    assert not artifacts.is_finished(tmp_path / "sft")
    with pytest.raises(artifacts.ArtifactError, match="not a finished artifact"):
        artifacts.read_manifest(tmp_path / "sft")


def test_republish_replaces_an_unfinished_folder(tmp_path: Path) -> None:
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "stale.bin").write_text("old")
    final = _publish(tmp_path / "sft", "new")
    assert not (final / "stale.bin").exists() and artifacts.is_finished(final)


def test_tree_digest_changes_with_content(tmp_path: Path) -> None:
    assert artifacts.tree_digest(_publish(tmp_path / "a", "x")) != artifacts.tree_digest(_publish(tmp_path / "b", "y"))


def test_cache_store_lookup_restore(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    assert cache.lookup("k1") is None
    cache.store("k1", _publish(tmp_path / "run1" / "sft", "abc", key="k1"))
    restored = cache.restore("k1", tmp_path / "run2" / "sft")
    assert (restored / "adapter" / "weights.bin").read_text() == "abc"
    assert artifacts.read_manifest(restored)["cache_key"] == "k1"


def test_cache_ignores_entries_whose_manifest_disagrees(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    _publish(tmp_path / "cache" / "k2", "abc", key="something-else")
    assert cache.lookup("k2") is None
    with pytest.raises(artifacts.ArtifactError):
        cache.restore("k2", tmp_path / "dest")


def test_concurrent_cache_stores_publish_one_whole_entry(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sources = [_publish(tmp_path / f"run{i}" / "sft", "same", key="k3") for i in range(4)]
    cache = ArtifactCache(tmp_path / "cache")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda src: cache.store("k3", src), sources))
    entry = cache.lookup("k3")
    assert entry is not None and (entry / "adapter" / "weights.bin").read_text() == "same"
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == ["k3"]


def test_json_files_are_strict_json(tmp_path: Path) -> None:
    """NaN and infinities become null: strict parsers (jq, JavaScript) read every file we write."""
    artifacts.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert __import__("json").loads(text) == {"a": None, "b": [1.5, None], "c": {"d": None}}


def test_a_cache_key_never_builds_the_builtin_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Computing a key reads the backbone's files and refuses, in one line, a built-in backbone not built
    yet (the CLI's pre-flight builds it in a process of its own); it never trains one as a side effect."""
    from stages.io.backbone_files import BackboneError, unbuilt_builtin
    from stages.io.config import load_config
    from stages.io.provenance import stage_provenance

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "empty-home"))
    cfg = load_config(None, [])
    assert unbuilt_builtin(cfg.backbone)
    with pytest.raises(
        BackboneError,
        match=r"^backbone.name=builtin:tiny: the built-in backbone is not built yet; "
        r"`rlhf build-backbone` builds it",
    ):
        stage_provenance("sft", cfg, {})
    assert not (tmp_path / "empty-home").exists()  # nothing was built, not even a folder


def test_a_stage_process_names_an_unknown_stage_in_one_line() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "stages.training.entry", "kto", "--out", "x"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown stage 'kto'; known: sft, reward, rrhf, ppo, dpo, grpo"
