"""Where an RL stage's rewards come from (``<stage>.reward``): the reward model, a checker, or both.

* ``model``: the reward stage's adapter and score head on the shared backbone, scoring the ids that
  were sampled (the recipe passes ``stages.model.reward_model.reward_of`` bound to them);
* ``checker``: a verifiable reward, a function called with the keywords ``prompts`` and
  ``completions`` (TRL's reward-function names; a function that takes ``**kwargs`` may ignore one) that
  returns one float per completion. ``<stage>.checker: builtin`` is the built-in task's checker (1.0
  for the exact sum, else 0.0); ``module:function`` names the user's own;
* ``model+checker``: ``model_weight * model + checker_weight * checker``.

Either way a response that never stopped loses ``missing_eos_penalty``. A checker that raises, returns
another number of rewards than responses, or a NaN/inf, stops the stage with one line naming it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from stages.io.arithmetic import check
from stages.io.config import ConfigError
from stages.io.formats import Prompt, prompt_text

if TYPE_CHECKING:
    from stages.model.sequences import Response

Checker = Callable[[list[Prompt], list[str]], Sequence[float]]
ModelScores = Callable[[list["Response"]], list[float]]  # the reward model's score of each sampled response
BUILTIN = "builtin"


class CheckerError(ConfigError):
    """The configured checker misbehaved (raised, wrong length, not finite); the message names it. A
    ConfigError: the runner reports it in one line, and needs no import of this module."""


def builtin_checker(prompts: list[Prompt], completions: list[str], **kwargs: Any) -> list[float]:
    """The built-in addition task's checker: 1.0 when a response is exactly the sum its prompt asks for
    (``"17+5="`` -> ``"22"``), else 0.0. Conversational prompts are read from their last message."""
    rewards = []
    for prompt, response in zip(prompts, completions, strict=True):
        text = prompt_text(prompt).strip()
        left, plus, right = text.removesuffix("=").rpartition("\n")[2].partition("+")
        if not (plus and text.endswith("=") and left.strip().isdigit() and right.strip().isdigit()):
            raise CheckerError(
                f"the builtin checker reads prompts like '17+5=', not {text!r}; name your own "
                "checker as module:function"
            )
        rewards.append(1.0 if check(response, str(int(left) + int(right))) else 0.0)
    return rewards


def load_checker(name: str) -> Checker:
    """``builtin`` or ``module:function``; ConfigError naming it when it cannot be imported (any error
    while its module runs counts), is not callable, or does not take the keywords it is called with."""
    if name == BUILTIN:
        return builtin_checker
    module, _, function = name.partition(":")
    try:
        found = getattr(import_module(module), function)
    except Exception as err:  # the user's module: a SyntaxError or its own failure is theirs, in one line
        raise ConfigError(f"checker {name!r}: cannot import it ({type(err).__name__}: {err})") from None
    if not callable(found):
        raise ConfigError(f"checker {name!r} is not a function")
    try:
        inspect.signature(found).bind(prompts=[], completions=[])
    except TypeError as err:
        raise ConfigError(
            f"checker {name!r} must accept the keywords prompts= and completions= (TRL's reward-"
            f"function names; **kwargs takes what it does not need): {err}"
        ) from None
    except ValueError:  # no signature to read (a builtin): the call itself will tell
        pass
    return found


@dataclass
class RewardSource:
    """The configured reward of one RL stage: the reward model, a checker, or their weighted sum."""

    kind: str  # model | checker | model+checker
    checker_name: str
    checker: Checker | None
    model_scores: ModelScores | None
    model_weight: float = 1.0
    checker_weight: float = 1.0
    missing_eos_penalty: float = 0.0

    @property
    def uses_model(self) -> bool:
        return self.model_scores is not None

    def __call__(self, samples: list[Response], prompts: list[Prompt]) -> list[float]:
        """One reward per sample, (N,) floats; ``prompts``: the prompt of each sample. A checker reads the
        prompts and the response texts; the reward model scores the sampled ids."""
        return self.parts(samples, prompts)["reward"]

    def parts(self, samples: list[Response], prompts: list[Prompt]) -> dict[str, list[float]]:
        """The reward of each sample (``reward``, what ``__call__`` returns) and the unweighted parts it is made
        of: ``reward_model`` (the reward model's score) and ``checker``, each where this source has it."""
        total = [0.0] * len(samples)
        found: dict[str, list[float]] = {}
        if self.model_scores is not None:
            found["reward_model"] = self.model_scores(samples)
            total = [t + self.model_weight * s for t, s in zip(total, found["reward_model"], strict=True)]
        if self.checker is not None:
            found["checker"] = self._checked(prompts, [s.text for s in samples])
            total = [t + self.checker_weight * c for t, c in zip(total, found["checker"])]
        found["reward"] = [t - (0.0 if s.finished else self.missing_eos_penalty) for t, s in zip(total, samples)]
        return found

    def _checked(self, prompts: list[Prompt], texts: list[str]) -> list[float]:
        try:
            found = self.checker(prompts=list(prompts), completions=list(texts))  # type: ignore[misc]
        except CheckerError:
            raise
        except Exception as err:  # a user's function: any error is theirs, reported in one line
            raise CheckerError(f"checker {self.checker_name!r} raised {type(err).__name__}: {err}") from None
        try:
            rewards = [float(x) for x in found]
        except (TypeError, ValueError):
            raise CheckerError(
                f"checker {self.checker_name!r} must return a list of numbers, got {type(found).__name__}"
            ) from None
        if len(rewards) != len(texts):
            raise CheckerError(
                f"checker {self.checker_name!r} returned {len(rewards)} rewards for {len(texts)} responses"
            )
        if bad := [i for i, x in enumerate(rewards) if not math.isfinite(x)]:
            raise CheckerError(
                f"checker {self.checker_name!r} returned {rewards[bad[0]]} for response "
                f"{bad[0]} ({texts[bad[0]]!r}); rewards must be finite"
            )
        return rewards


def reward_source(section: Any, model_scores: ModelScores | None) -> RewardSource:
    """The reward source of an RL stage's config ``section`` (its ``reward``, ``checker``, weights and
    ``missing_eos_penalty``). ``model_scores``: the reward model's scores when ``reward`` uses the model.
    Raises ConfigError when the checker cannot be imported, or the model is configured but not given."""
    if ("model" in section.reward) != (model_scores is not None):
        raise ConfigError(f"reward={section.reward!r} needs the reward model's scores exactly when it names the model")
    checker = load_checker(section.checker) if "checker" in section.reward else None
    both = section.reward == "model+checker"  # the weights mix two sources; one source alone is not rescaled
    return RewardSource(
        section.reward,
        section.checker,
        checker,
        model_scores,
        section.model_weight if both else 1.0,
        section.checker_weight if both else 1.0,
        section.missing_eos_penalty,
    )
