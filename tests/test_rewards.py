"""Reward sources of the RL stages: the built-in checker, a user's ``module:function``, their errors
(one line naming the function), and the weighted sum with the reward model (tests/test_grpo.py runs it)."""

import sys
from pathlib import Path

import pytest

from stages.io.config import ConfigError, load_config
from stages.io.provenance import check_datasets, checker_digest
from stages.model.sequences import Response
from stages.registry import missing_inputs
from stages.training.rewards import CheckerError, builtin_checker, load_checker, reward_source


def _responses(texts: list[str], finished: list[bool] | None = None) -> list[Response]:
    finished = finished or [True] * len(texts)
    return [
        Response(text=t, prompt_ids=(1,), token_ids=(2,), finished=f, token_logprobs=(0.0,))
        for t, f in zip(texts, finished)
    ]


def test_the_builtin_checker_scores_exact_sums_of_plain_and_conversational_prompts() -> None:
    prompts = ["3+4=", "12+19=", [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+2="}], "3+4="]
    assert builtin_checker(prompts, ["7", "31", "4", "7;1+1=2"]) == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(CheckerError, match="the builtin checker reads prompts like '17\\+5=', not 'Hello'"):
        builtin_checker(["Hello"], ["7"])


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_rewards.py").write_text(
        "def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"  # TRL-style
        "def raises(prompts, completions):\n    raise KeyError('score')\n"
        "def short(prompts, completions):\n    return [1.0]\n"
        "def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n"
        "def text(prompts, completions):\n    return 'good'\n"
        "def positional(prompts, responses):\n    return [1.0] * len(responses)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_a_user_checker_is_called_with_prompts_and_texts(user_module: str) -> None:
    cfg = load_config(
        None,
        [
            "grpo.reward=checker",
            f"grpo.checker={user_module}:length",
            "grpo.checker_weight=0.5",
            "grpo.missing_eos_penalty=2",
        ],
    )
    source = reward_source(cfg.grpo, model_scores=None)
    assert not source.uses_model
    rewards = source(_responses(["ab", "abcd"], [True, False]), ["1+1=", "2+2="])
    assert rewards == [2.0, 4.0 - 2.0]  # one source alone is not rescaled; the unfinished one is penalised


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("raises", "checker 'my_rewards:raises' raised KeyError: 'score'"),
        ("short", "checker 'my_rewards:short' returned 1 rewards for 2 responses"),
        ("nan", "checker 'my_rewards:nan' returned nan for response 0 \\('a'\\); rewards must be finite"),
        ("text", "checker 'my_rewards:text' must return a list of numbers, got str"),
    ],
)
def test_a_misbehaving_user_checker_is_one_error_naming_it(user_module: str, function: str, message: str) -> None:
    cfg = load_config(None, ["grpo.reward=checker", f"grpo.checker={user_module}:{function}"])
    source = reward_source(cfg.grpo, model_scores=None)
    with pytest.raises(CheckerError, match=message):
        source(_responses(["a", "b"]), ["1+1=", "2+2="])


def test_a_checker_without_trls_keywords_is_refused_before_training(user_module: str) -> None:
    with pytest.raises(
        ConfigError, match="checker 'my_rewards:positional' must accept the keywords prompts= and completions="
    ):
        load_checker(f"{user_module}:positional")


def test_a_checker_beside_the_config_is_found_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `python -m stages.training.entry grpo` imports it: the working directory first (the rlhf script has its bin/)."""
    (tmp_path / "beside_config.py").write_text(
        "def score(prompts, completions):\n    return [0.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["run.stages=[sft,grpo]", "grpo.reward=checker", "grpo.checker=beside_config:score"])
    assert checker_digest("grpo", cfg) is not None and str(tmp_path) not in sys.path


def test_a_checker_that_cannot_be_imported_or_named_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="checker 'no_such_module:fn': cannot import it \\(ModuleNotFoundError"):
        load_checker("no_such_module:fn")
    with pytest.raises(ConfigError, match="grpo.checker='no_such_module:fn': cannot find module 'no_such_module'"):
        check_datasets(
            load_config(None, ["run.stages=[sft,grpo]", "grpo.reward=checker", "grpo.checker=no_such_module:fn"])
        )
    with pytest.raises(
        ConfigError, match=r"grpo.checker: Value error, expected builtin or module:function, got 'nocolon'"
    ):
        load_config(None, ["grpo.checker=nocolon"])


def test_model_plus_checker_is_the_weighted_sum() -> None:
    cfg = load_config(None, ["grpo.reward=model+checker", "grpo.model_weight=2", "grpo.checker_weight=0.5"])
    source = reward_source(cfg.grpo, model_scores=lambda samples: [10.0 * len(s.text) for s in samples])
    assert source(_responses(["7", "77"], [True, False]), ["3+4=", "3+4="]) == [2 * 10 + 0.5 * 1, 2 * 20 + 0 - 1.0]
    with pytest.raises(ConfigError, match="needs the reward model's scores exactly when it names the model"):
        reward_source(cfg.grpo, model_scores=None)


def test_a_checker_alone_needs_no_reward_stage() -> None:
    cfg = load_config(None, ["run.stages=[sft,grpo]", "grpo.reward=checker"])
    assert missing_inputs(["sft", "grpo"], cfg) == []
    with pytest.raises(
        ConfigError, match=r"grpo needs the reward stage \(it reads its artifact\), or grpo.reward=checker"
    ):
        load_config(None, ["run.stages=[sft,grpo]"])
    with pytest.raises(ConfigError, match="grpo needs the reward stage"):
        load_config(None, ["run.stages=[sft,grpo]", "grpo.reward=model+checker"])


def test_editing_a_user_checker_changes_the_stage_cache_key(user_module: str, tmp_path: Path) -> None:
    cfg = load_config(None, ["run.stages=[sft,grpo]", "grpo.reward=checker", f"grpo.checker={user_module}:length"])
    before = checker_digest("grpo", cfg)
    (tmp_path / "my_rewards.py").write_text((tmp_path / "my_rewards.py").read_text() + "# edited\n")
    assert checker_digest("grpo", cfg) != before
    assert checker_digest("grpo", load_config(None, ["grpo.reward=checker"])) is None  # builtin: the stage's code
    assert checker_digest("grpo", load_config(None, [f"grpo.checker={user_module}:length"])) is None  # model only
