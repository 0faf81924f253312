"""The dataset formats (TRL's names): each loads, from the shipped examples and from HF ``datasets``;
each malformed row is refused with the file and the line; column mapping; implicit-prompt extraction."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.io.config import DataSource, TaskSection, load_config
from stages.io.data import DataError, load_records, load_rollout_prompts
from stages.io.formats import FORMATS
from tests.conftest import REPO

TASK = TaskSection()
EXAMPLES = REPO / "examples" / "data"
USER = [{"role": "user", "content": "3+4="}]


def _records(tmp_path: Path, kind: str, rows: list, columns: dict | None = None) -> list[dict]:
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_records(DataSource(source=str(path), columns=columns) if columns else str(path), kind, TASK)


@pytest.mark.parametrize(
    ("file", "kind", "first"),
    [
        ("sft-prompt-completion.jsonl", "sft", {"prompt": "6+10=", "completion": "16"}),
        (
            "sft-prompt-completion-conversational.jsonl",
            "sft",
            {"prompt": [{"role": "user", "content": "6+10="}], "completion": "16"},
        ),
        ("sft-messages.jsonl", "sft", {"prompt": [{"role": "user", "content": "6+10="}], "completion": "16"}),
        ("sft-text.jsonl", "sft", {"prompt": "", "completion": "6+10=16"}),
        ("preferences-explicit.jsonl", "preferences", {"prompt": "12+2=", "chosen": "14", "rejected": "14;15+15=30"}),
        (
            "preferences-implicit-hh.jsonl",
            "preferences",
            {"prompt": "\n\nHuman: 12+2=\n\nAssistant:", "chosen": " 14", "rejected": " 14;15+15=30"},
        ),
        (
            "preferences-implicit-conversational.jsonl",
            "preferences",
            {"prompt": [{"role": "user", "content": "12+2="}], "chosen": "14", "rejected": "14;15+15=30"},
        ),
        (
            "preferences-ultrafeedback.jsonl",
            "preferences",
            {
                "prompt": [{"role": "user", "content": "12+2="}],
                "chosen": "14",
                "rejected": "14;15+15=30",
                "score_chosen": 9.0,
                "score_rejected": 3.0,
            },
        ),
        ("prompts.jsonl", "prompts", None),
        ("prompts-conversational.jsonl", "prompts", None),
        ("eval.jsonl", "eval", None),
        ("eval-conversational.jsonl", "eval", None),
        ("ranked.jsonl", "ranked", None),
    ],
)
def test_each_shipped_example_loads(file: str, kind: str, first: dict | None) -> None:
    records = load_records(str(EXAMPLES / file), kind, TASK)
    assert len(records) == 5
    if first is not None:
        assert records[0] == first


def test_shipped_examples_are_what_the_generator_writes() -> None:
    result = subprocess.run(
        [sys.executable, "examples/make_data.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_column_mapping_renames_columns_and_names_a_missing_one(tmp_path: Path) -> None:
    ref = DataSource(source=str(EXAMPLES / "preferences-renamed-columns.jsonl"), columns={"prompt": "question"})
    assert load_records(ref, "preferences", TASK)[0] == {"prompt": "12+2=", "chosen": "14", "rejected": "14;15+15=30"}
    with pytest.raises(DataError, match=r"preferences.jsonl: line 1: no column\(s\) \['query_text'\]"):
        _records(tmp_path, "preferences", [{"chosen": "a b", "rejected": "a c"}], {"prompt": "query_text"})
    cfg = load_config(None, [f"data.preferences={{source: {ref.source}, columns: {{prompt: question}}}}"])
    assert cfg.data.preferences == ref


def test_a_mapping_to_keys_no_format_reads_is_a_config_error() -> None:
    from stages.io.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"data: Value error, preferences.columns: \['promt'\] are not "
        r"keys of any preferences format",
    ):
        load_config(None, ["data.preferences={source: x.jsonl, columns: {promt: question}}"])
    with pytest.raises(ConfigError, match="sft.columns: the builtin dataset has no columns to map"):
        load_config(None, ["data.sft={source: builtin, columns: {prompt: q}}"])


def test_null_columns_count_as_absent(tmp_path: Path) -> None:
    """Parquet and HF rows carry every column of their table: a text row with null prompt/completion."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": "1+1=", "completion": "2", "text": None}, {"prompt": None, "completion": None, "text": "1+2=3"}]
        ),
        path,
    )
    assert load_records(str(path), "sft", TASK) == [
        {"prompt": "1+1=", "completion": "2"},
        {"prompt": "", "completion": "1+2=3"},
    ]


def test_config_file_dataset_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.jsonl").write_text('{"prompt": "1+1="}\n')
    (tmp_path / "run.yaml").write_text("data:\n  prompts: data/p.jsonl\n  sft: builtin\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.data.prompts == str((tmp_path / "data" / "p.jsonl").resolve())
    assert load_rollout_prompts(cfg.data, cfg.task) == ["1+1="]


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        (
            "sft",
            {"prompt": "a", "answer": "b"},
            "line 1: fits no sft format; expected prompt-completion ['prompt', "
            "'completion'] or language modeling (messages) ['messages'] or language modeling (text) ['text']; the row has "
            "keys ['answer', 'prompt']",
        ),
        ("sft", {"messages": USER}, "line 1: 'messages' must end with an assistant message"),
        (
            "sft",
            {"prompt": USER, "completion": [{"role": "user", "content": "x"}]},
            "line 1: 'completion' must hold exactly one assistant message",
        ),
        (
            "sft",
            {"prompt": [{"role": "robot", "content": "x"}], "completion": "y"},
            "line 1: 'prompt' message 0: expected",
        ),
        ("sft", {"text": ""}, "line 1: 'text' must be a non-empty string"),
        ("preferences", {"chosen": "7", "rejected": "8"}, "line 1: 'chosen' and 'rejected' share no prompt"),
        (
            "preferences",
            {"chosen": "Q: 1+1= 2", "rejected": "Q: 1+1= 2"},
            "line 1: 'chosen' and 'rejected' are the same",
        ),
        (
            "preferences",
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
            },
            "line 1: 'chosen' and 'rejected' share no first message",
        ),
        (
            "preferences",
            {"chosen": USER, "rejected": "x"},
            "line 1: 'chosen' and 'rejected' must both be strings or both",
        ),
        (
            "preferences",
            {
                "chosen": USER + [{"role": "assistant", "content": "7"}],
                "rejected": USER + [{"role": "assistant", "content": "7"}],
            },
            "line 1: 'chosen' and 'rejected' are the same messages",
        ),
        (
            "preferences",
            {"prompt": "1+1=", "chosen": "2", "rejected": "3", "score_chosen": float("nan")},
            "line 1: 'score_chosen' must hold finite numbers",
        ),
        ("preferences", {"prompt": "q", "rejected": "3"}, "line 1: fits no preferences format"),
        (
            "prompts",
            {"prompt": [{"role": "assistant", "content": "x"}]},
            "line 1: 'prompt' ends with an assistant message",
        ),
        ("eval", {"prompt": "1+1="}, "line 1: fits no eval format; expected prompt-answer ['prompt', 'answer']"),
        (
            "ranked",
            {"query": "q", "responses": ["a", "b"], "scores": [1.0, float("nan")]},
            "line 1: 'scores' must hold finite numbers",
        ),
    ],
)
def test_a_malformed_row_names_the_file_the_line_and_the_formats(
    tmp_path: Path, kind: str, row: dict, message: str
) -> None:
    with pytest.raises(DataError) as err:
        _records(tmp_path, kind, [row])
    assert str(err.value).startswith(f"{tmp_path / kind}.jsonl: ") and message in str(err.value), str(err.value)


def test_every_format_is_documented_in_the_readme_with_its_example() -> None:
    readme = (REPO / "README.md").read_text()
    for kind, formats in FORMATS.items():
        for fmt in formats:
            assert fmt.example in readme, (kind, fmt.name)


def test_language_modeling_text_has_no_rollout_prompts_unless_data_prompts_is_set() -> None:
    cfg = load_config(None, [f"data.sft={EXAMPLES / 'sft-text.jsonl'}"])
    with pytest.raises(DataError, match="language-modeling rows have no prompts to roll out on; set data.prompts"):
        load_rollout_prompts(cfg.data, cfg.task)
    cfg = load_config(None, [f"data.sft={EXAMPLES / 'sft-text.jsonl'}", f"data.prompts={EXAMPLES / 'prompts.jsonl'}"])
    assert len(load_rollout_prompts(cfg.data, cfg.task)) == 5


def test_hf_datasets_splits_load_through_the_same_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hf:NAME:SPLIT`` with the split UltraFeedback-binarized uses (``train_prefs``), from a local dataset
    folder (no hub here): ``datasets.load_dataset`` reads it the way it reads a downloaded one."""
    folder = tmp_path / "ultrafeedback"
    folder.mkdir()
    rows = (EXAMPLES / "preferences-ultrafeedback.jsonl").read_text()
    (folder / "train_prefs.jsonl").write_text(rows)
    (folder / "test_prefs.jsonl").write_text(rows)
    # Splits named as UltraFeedback-binarized's dataset card names them.
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train_prefs\n    path: train_prefs.jsonl\n"
        "  - split: test_prefs\n    path: test_prefs.jsonl\n---\n"
    )
    records = load_records(f"hf:{folder}:train_prefs", "preferences", TASK)
    assert records == load_records(str(EXAMPLES / "preferences-ultrafeedback.jsonl"), "preferences", TASK)
    with pytest.raises(DataError, match="split 'nope'"):
        load_records(f"hf:{folder}:nope", "preferences", TASK)
