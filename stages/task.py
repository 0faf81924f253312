"""The built-in verifiable task: addition of two numbers, with an exact checker.

Prompt ``"17+5="``, correct response ``"22"`` followed by the end-of-sequence token. The design:

* the backbone is pretrained on streams of correct equations joined by ``;``, with end-of-sequence
  only at the end of a stream, so the base model knows arithmetic but after an answer it writes
  ``;`` and the next equation instead of stopping: its ``task_score`` is about 0;
* SFT demonstrations teach the format but are deliberately imperfect (``demo_accuracy`` of them are
  right; the rest are plausible mistakes), so sampling from the SFT policy is often wrong;
* preference pairs always prefer the correct answer, so a reward model can learn the checker and
  PPO/RRHF can push ``task_score`` above SFT's;
* evaluation prompts are held out of both SFT demonstrations and preference pairs.

Everything is a pure function of ``TaskSection`` (seeded), so datasets are reproducible and digestible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stages.config import TaskSection

EQUATION_SEPARATOR = ";"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def check(response: str, answer: str) -> bool:
    """The checker: the response (text before end-of-sequence) is exactly the answer."""
    return response.strip() == answer


def plausible_mistake(problem: Problem, rng: random.Random) -> str:
    """A wrong answer a careless adder would give: off by one, or a forgotten carry."""
    total = problem.a + problem.b
    candidates = {total + 1, max(total - 1, 0)}
    if (problem.a % 10) + (problem.b % 10) >= 10:  # a carry exists, so forgetting it is a mistake
        candidates.add(total - 10)
    candidates.discard(total)
    return str(rng.choice(sorted(candidates)))


def _split(cfg: TaskSection) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out evaluation problems), shuffled deterministically."""
    problems = [Problem(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_operand + 1)]
    random.Random(cfg.seed).shuffle(problems)
    return problems[cfg.num_eval :], problems[: cfg.num_eval]


def sft_records(cfg: TaskSection) -> list[dict[str, str]]:
    """Prompt/completion demonstrations; about ``1 - demo_accuracy`` of them are wrong on purpose."""
    rng = random.Random(cfg.seed + 1)
    train, _ = _split(cfg)
    records = []
    for _ in range(cfg.num_sft):
        problem = rng.choice(train)
        right = rng.random() < cfg.demo_accuracy
        completion = problem.answer if right else plausible_mistake(problem, rng)
        records.append({"prompt": problem.prompt, "completion": completion})
    return records


def preference_records(cfg: TaskSection) -> list[dict[str, str]]:
    """(prompt, chosen, rejected): the correct answer is always chosen over a plausible mistake."""
    rng = random.Random(cfg.seed + 2)
    train, _ = _split(cfg)
    records = []
    for _ in range(cfg.num_pairs):
        problem = rng.choice(train)
        records.append(
            {"prompt": problem.prompt, "chosen": problem.answer, "rejected": plausible_mistake(problem, rng)}
        )
    return records


def eval_records(cfg: TaskSection) -> list[dict[str, str]]:
    """Held-out prompts with their reference answers."""
    _, held_out = _split(cfg)
    return [{"prompt": p.prompt, "answer": p.answer} for p in held_out]


def pretraining_lines(max_operand: int, seed: int, num_lines: int, equations_per_line: int) -> list[str]:
    """Streams of correct equations, ``"3+4=7;12+9=21;..."`` (the builder appends end-of-sequence)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        problems = [Problem(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(equations_per_line)]
        lines.append(EQUATION_SEPARATOR.join(p.prompt + p.answer for p in problems) + EQUATION_SEPARATOR)
    return lines
