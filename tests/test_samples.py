"""Sample tables (issue 32, item 1): every stage that generates keeps held-out prompts with what its policy
says, at logged steps and at the final evaluation (with the SFT reference's answer), in ``samples.jsonl``
and as W&B Tables read back from the offline run; keeping them changes nothing that is trained."""

import json
from pathlib import Path

import pytest

from stages.io.config import load_config
from stages.io.samples import COLUMNS, read_samples
from stages.training.runner import execute
from tests.conftest import TINY, chain_stages, train_upstream

SETS = [*TINY, "tracking.backend=none", "eval.samples=3", "eval.num_prompts=5"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_upstream(tmp_path_factory.mktemp("upstream"), SETS)


def _train(stage: str, out: Path, upstream: dict[str, Path], extra: list[str] = ()) -> dict:
    fn, needs = chain_stages()[stage]
    cfg = load_config(None, [*SETS, *extra])
    return execute(stage, fn, cfg, out, {name: upstream[name] for name in needs})


def _by_moment(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    found: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        found.setdefault((row["phase"], row["step"]), []).append(row)
    return found


@pytest.mark.parametrize(
    ("stage", "last", "rewards"),
    [
        ("grpo", 2, {"reward", "reward_model"}),
        ("ppo", 2, {"reward", "reward_model"}),
        ("rrhf", 3, {"reward", "reward_model"}),
        ("dpo", 3, set()),
    ],
)
def test_each_rl_stage_keeps_step_and_final_tables(
    stage: str, last: int, rewards: set[str], upstream: dict[str, Path], tmp_path: Path
) -> None:
    """A table of the 3 first held-out prompts after each logged step but the last, and the final one with the
    reference's responses; rewards where the stage has a reward source (DPO has none)."""
    manifest = _train(stage, tmp_path / stage, upstream)
    _assert_every_metric_has_a_meaning(stage, manifest["metrics"])
    rows = read_samples(tmp_path / stage)
    moments = _by_moment(rows)
    assert list(moments) == [*(("step", s) for s in range(1, last)), ("final", last)]
    prompts = [row["prompt"] for row in moments[("final", last)]]
    assert len(prompts) == 3 and all(len(group) == 3 for group in moments.values())
    assert all([row["prompt"] for row in group] == prompts for group in moments.values())  # the same prompts
    for row in rows:
        assert list(row) == list(COLUMNS)
        assert row["correct"] == (row["finished"] and row["response"].strip() == row["answer"])
        assert {k for k in ("reward", "reward_model", "checker") if row[k] is not None} == rewards
        assert (row["reference_response"] is not None) == (row["phase"] == "final")
    # The final table is the final evaluation's first samples: its task_score counts them among the 5.
    assert sum(row["correct"] for row in moments[("final", last)]) <= manifest["metrics"]["task_score"] * 5
    if rewards:  # model scores: the rewards of the table's responses, not one number for all
        assert len({row["reward"] for row in rows}) > 1


def _assert_every_metric_has_a_meaning(stage: str, metrics: dict) -> None:
    """The pages show each final metric with its unit and meaning (flows.glossary): none may lack one."""
    from flows.glossary import meaning

    assert not [name for name in metrics if meaning(stage, name) is None], stage


def test_sft_keeps_the_base_models_and_its_own_responses(upstream: dict[str, Path]) -> None:
    rows = read_samples(upstream["sft"])
    manifest = json.loads((upstream["sft"] / "manifest.json").read_text())
    for stage in ("sft", "reward"):
        _assert_every_metric_has_a_meaning(
            stage, json.loads((upstream[stage] / "manifest.json").read_text())["metrics"]
        )
    assert [(row["phase"], row["step"]) for row in rows] == [("before", 0)] * 3 + [("final", 3)] * 3
    before, after = rows[:3], rows[3:]
    assert [row["prompt"] for row in before] == [row["prompt"] for row in after]
    assert sum(row["correct"] for row in before) <= manifest["metrics"]["task_score_before"] * 5
    assert all(row["reward"] is None and row["reference_response"] is None for row in rows)


def test_tables_observe_training_without_changing_it(upstream: dict[str, Path], tmp_path: Path) -> None:
    """The step tables sample between updates: the history and weights must be those of a run without them
    (generation forks its random state, and the tables use no training batch)."""
    _train("grpo", tmp_path / "with", upstream)
    _train("grpo", tmp_path / "without", upstream, ["eval.samples=0"])
    assert read_samples(tmp_path / "without") == [] and read_samples(tmp_path / "with")
    assert (tmp_path / "with" / "history.json").read_text() == (tmp_path / "without" / "history.json").read_text()
    weights = sorted(p.relative_to(tmp_path / "with") for p in (tmp_path / "with").rglob("*.safetensors"))
    assert weights
    for path in weights:
        assert (tmp_path / "with" / path).read_bytes() == (tmp_path / "without" / path).read_bytes(), path


def test_tables_reach_wandb_one_per_step_and_read_back_offline(upstream: dict[str, Path], tmp_path: Path) -> None:
    """W&B offline: each moment is a Table of its own key (a later step never replaces an earlier one), and
    the offline run's files hold the same rows as samples.jsonl."""
    _train("grpo", tmp_path / "grpo", upstream, ["tracking.backend=wandb", "tracking.mode=offline"])
    rows = read_samples(tmp_path / "grpo")
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    tables = sorted((offline / "files" / "media" / "table" / "grpo" / "samples").glob("*.table.json"))
    names = [path.name.split("_")[0] for path in tables]
    assert names == ["final", "step-000001"], names
    for path, moment in zip(tables, [("final", 2), ("step", 1)], strict=True):
        table = json.loads(path.read_text())
        assert table["columns"] == list(COLUMNS)
        expected = [[row[c] for c in COLUMNS] for row in rows if (row["phase"], row["step"]) == moment]
        assert table["data"] == expected


def test_a_table_reads_back_whatever_the_model_said(tmp_path: Path) -> None:
    """Line and paragraph separators (U+2028, U+0085) are text to JSON but line ends to str.splitlines."""
    from stages.io.samples import write_samples

    rows = [{"phase": "final", "step": 1, "response": "a\u2028b\u0085c\u2029d\re"}, {"phase": "final", "step": 1}]
    write_samples(tmp_path, rows)
    assert read_samples(tmp_path) == rows


def test_samples_every_counts_logged_steps(upstream: dict[str, Path], tmp_path: Path) -> None:
    """RRHF of 7 steps logs steps 2, 4 and 6 (and the last); a table every 2nd logged step is one after step 4,
    then the final evaluation's after step 7."""
    _train("rrhf", tmp_path / "rrhf", upstream, ["rrhf.max_steps=7", "rrhf.logging_steps=2", "eval.samples_every=2"])
    assert list(_by_moment(read_samples(tmp_path / "rrhf"))) == [("step", 4), ("final", 7)]
