import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.io import arithmetic
from stages.io.config import TaskSection
from stages.io.data import DataError, dataset_digest, load_records

CFG = TaskSection()


def test_checker_is_exact() -> None:
    assert arithmetic.check("22", "22") and arithmetic.check(" 22 ", "22")
    assert not arithmetic.check("23", "22") and not arithmetic.check("22;", "22") and not arithmetic.check("", "22")


def test_demonstrations_are_imperfect_at_the_configured_rate() -> None:
    demos = arithmetic.sft_records(CFG)
    right = sum(d["completion"] == str(eval(d["prompt"].rstrip("="))) for d in demos)
    assert abs(right / len(demos) - CFG.demo_accuracy) < 0.07
    assert right < len(demos)  # room for RLHF to improve


def test_preferences_always_prefer_the_correct_answer() -> None:
    for pair in arithmetic.preference_records(CFG):
        truth = str(eval(pair["prompt"].rstrip("=")))
        assert pair["chosen"] == truth and pair["rejected"] != truth
        assert pair["rejected"].startswith(truth + ";")  # rambling, not a wrong sum


def test_the_harder_variant_adds_wrong_sums_and_label_noise_and_leaves_the_default_alone() -> None:
    default, hard = TaskSection(), TaskSection(wrong_answer_rate=0.4, label_noise=0.1)
    plain, noisy = arithmetic.sft_records(default), arithmetic.sft_records(hard)
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in noisy]  # the same problems, in order

    def correct(record: dict) -> bool:
        a, b = record["prompt"].removesuffix("=").split("+")
        return record["completion"].split(";")[0] == str(int(a) + int(b))

    assert all(correct(r) for r in plain)
    wrong = [r for r in noisy if not correct(r)]
    assert 0.3 < len(wrong) / len(noisy) < 0.5
    # a wrong sum keeps the demonstration's shape: it stops, or it rambles on as the default one did
    assert {";" in r["completion"] for r in wrong} == {True, False}
    pairs, swapped = arithmetic.preference_records(default), arithmetic.preference_records(hard)
    flipped = [p for p, q in zip(pairs, swapped) if p["chosen"] == q["rejected"] and p["rejected"] == q["chosen"]]
    assert 0.05 < len(flipped) / len(pairs) < 0.15
    assert all(p == q for p, q in zip(pairs, swapped) if p not in flipped)


def test_eval_prompts_are_held_out_and_generation_is_deterministic() -> None:
    held_out = {r["prompt"] for r in arithmetic.eval_records(CFG)}
    assert len(held_out) == CFG.num_eval
    seen = {r["prompt"] for r in arithmetic.sft_records(CFG)} | {
        r["prompt"] for r in arithmetic.preference_records(CFG)
    }
    assert not held_out & seen
    assert arithmetic.sft_records(CFG) == arithmetic.sft_records(TaskSection())
    assert arithmetic.sft_records(CFG) != arithmetic.sft_records(TaskSection(seed=CFG.seed + 1))


def test_jsonl_and_parquet_load_the_same_records(tmp_path: Path) -> None:
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3", "extra": 1}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    expected = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    assert load_records(str(jsonl), "preferences", CFG) == expected
    assert load_records(str(parquet), "preferences", CFG) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"prompt": "a", "completion": "b"}', "{oops"], "line 2: not valid JSON"),
        (['{"prompt": "a"}'], "line 1: fits no sft format; expected prompt-completion ['prompt', 'completion']"),
        (['{"prompt": "a", "completion": ""}'], "line 1: 'completion' must be a non-empty string"),
        (['{"prompt": "a", "completion": 3}'], "line 1: 'completion' must be a non-empty string"),
        (['["prompt", "completion"]'], "line 1: expected an object"),
        ([""], "no sft records"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_records(str(path), "sft", CFG)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_malformed_parquet_row_is_named(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": None}]), path)
    with pytest.raises(DataError, match=r"e.parquet: row 2: fits no eval format; expected prompt-answer"):
        load_records(str(path), "eval", CFG)


@pytest.mark.parametrize(
    ("source", "expected"), [("missing.jsonl", "no such file"), ("data.csv", "unsupported file type")]
)
def test_unusable_sources(tmp_path: Path, source: str, expected: str) -> None:
    (tmp_path / "data.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match=expected):
        load_records(str(tmp_path / source), "sft", CFG)


def test_hf_source_failure_is_one_clear_error() -> None:
    # No hub is reachable here: the error must still be ours, naming the source.
    with pytest.raises(DataError, match="hf:no-such-org/no-such-dataset:train: cannot load HF dataset"):
        load_records("hf:no-such-org/no-such-dataset:train", "sft", CFG)


def test_dataset_digest_follows_content(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    first = dataset_digest(str(path), "sft", CFG)
    path.write_text('{"prompt": "1+1=", "completion": "3"}\n')
    assert dataset_digest(str(path), "sft", CFG) != first
    assert dataset_digest("builtin", "sft", CFG) != dataset_digest("builtin", "sft", TaskSection(demo_accuracy=0.9))


@pytest.mark.parametrize(
    ("kind", "row", "expected"),
    [
        ("preferences", {"prompt": "1+1=", "rejected": "3"}, "row 1: fits no preferences format"),
        (
            "preferences",
            {"prompt": "1+1=", "chosen": "2", "rejected": " 2"},
            "row 1: 'chosen' and 'rejected' are the same",
        ),
        (
            "preferences",
            {"prompt": "1+1=", "chosen": "  ", "rejected": "3"},
            "row 1: 'chosen' must be a non-empty string",
        ),
        (
            "ranked",
            {"query": "1+1=", "responses": ["2", "3"], "scores": [1.0]},
            "'scores' has 1 entries but 'responses' has 2",
        ),
        ("ranked", {"query": "1+1=", "responses": [], "scores": []}, "'responses' must be a non-empty list"),
        ("ranked", {"query": "1+1=", "responses": ["2"], "scores": ["high"]}, "'scores' must hold finite numbers"),
    ],
)
def test_bad_preference_and_ranked_rows_are_named(tmp_path: Path, kind: str, row: dict, expected: str) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(DataError) as err:
        load_records(str(path), kind, CFG)  # type: ignore[arg-type]
    assert str(path) in str(err.value) and expected in str(err.value)


def test_ranked_jsonl_loads(tmp_path: Path) -> None:
    path = tmp_path / "ranked.jsonl"
    path.write_text(json.dumps({"query": "1+1=", "responses": ["2", "3"], "scores": [1, -1.5]}) + "\n")
    assert load_records(str(path), "ranked", CFG) == [{"query": "1+1=", "responses": ["2", "3"], "scores": [1, -1.5]}]


def test_a_dataset_is_read_once_per_content_until_its_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dataset store validates a file once per content, for every later process (a new process finds
    it by content, not by this process's memory), and an edited file is read again."""
    from stages.io import dataset_store

    path = tmp_path / "demos.jsonl"
    path.write_text('{"prompt": "store 1+1=", "completion": "2"}\n')
    builds = []
    build = dataset_store._build
    monkeypatch.setattr(dataset_store, "_build", lambda *args: builds.append(args) or build(*args))
    mine = load_records(str(path), "sft", CFG)
    dataset_digest(str(path), "sft", CFG)  # the cache key reads the same records
    assert load_records(str(path), "sft", CFG) == mine and len(builds) == 1
    mine[0]["prompt"] = "changed"  # each caller gets its own records
    assert load_records(str(path), "sft", CFG)[0]["prompt"] == "store 1+1="
    dataset_store._stored.cache_clear()  # as a new process: found in the store by content
    assert load_records(str(path), "sft", CFG)[0]["prompt"] == "store 1+1=" and len(builds) == 1
    path.write_text('{"prompt": "store 10+10=", "completion": "20"}\n')  # an edited file is read again
    assert load_records(str(path), "sft", CFG)[0]["prompt"] == "store 10+10=" and len(builds) == 2
    path.write_text('{"prompt": "store 1+1=", "completion": "2"}\n')  # the old content is still in the store
    assert load_records(str(path), "sft", CFG)[0]["prompt"] == "store 1+1=" and len(builds) == 2


def test_a_bad_row_leaves_nothing_in_the_dataset_store(tmp_path: Path) -> None:
    """Validation streams into a temporary folder that a bad row removes: no table, no staging leftovers."""
    from stages.io.paths import rlhf_home

    store = rlhf_home() / "datasets"
    before = set(store.iterdir()) if store.is_dir() else set()
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "store bad 1+1=", "completion": "2"})
    path.write_text("\n".join([good] * 20_000 + ['{"prompt": "1+1="}']) + "\n")  # past the first written batch
    with pytest.raises(DataError, match=r"bad.jsonl: line 20001: fits no sft format"):
        load_records(str(path), "sft", CFG)
    assert (set(store.iterdir()) if store.is_dir() else set()) == before


def test_the_evaluation_sample_is_bounded_reproducible_and_in_file_order() -> None:
    from stages.io.data import evaluation_sample

    held = [{"prompt": f"{i}+0=", "chosen": str(i), "rejected": f"{i};"} for i in range(1000)]
    sample = evaluation_sample(held, 64, seed=0)
    assert len(sample) == 64 and sample == evaluation_sample(held, 64, seed=0)
    assert [held.index(r) for r in sample] == sorted(held.index(r) for r in sample)
    assert sample != evaluation_sample(held, 64, seed=1)
    assert evaluation_sample(held, 0, seed=0) == held and evaluation_sample(held[:10], 64, seed=0) == held[:10]


def test_a_killed_writers_leftovers_are_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    """A process killed while it wrote the store leaves a temporary file; the next build on this host removes
    it when its process is gone, and never touches one a running process is still writing."""
    import socket
    import subprocess
    import sys

    from stages.io.paths import rlhf_home

    store = rlhf_home() / "datasets"
    store.mkdir(parents=True, exist_ok=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = store / f".abc.{host}.{gone.pid}.tmp"
    dead.mkdir()
    live = store / f".abc.{host}.{os.getppid()}.tmp"
    live.write_text("being written")
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps({"prompt": "sweep 1+1=", "completion": "2"}) + "\n")
    load_records(str(path), "sft", CFG)
    assert not dead.exists() and live.exists()
    live.unlink()
