"""The built-in verifiable task: addition of two numbers, answered with the number and nothing else.

Prompt ``"17+5="``, correct response ``"22"`` followed by end-of-sequence. The design:

* the backbone is pretrained on streams of correct equations joined by ``;``, with end-of-sequence
  only at the end of a stream, so the base model knows arithmetic but after an answer it writes
  ``;`` and the next equation instead of stopping: its ``task_score`` is about 0;
* SFT demonstrations teach it to stop, but are deliberately imperfect: only ``demo_accuracy`` of them
  stop after the answer; the rest ramble on with one more equation (``"22;3+4=7"``), the verbosity
  failure RLHF is classically used against. Sampling from the SFT policy therefore often fails;
* preference pairs prefer the exact answer over a rambling one, so a reward model can learn the
  checker from its last hidden state and PPO/RRHF can push ``task_score`` above SFT's (the harder
  variant adds wrong sums to the demonstrations and swaps a share of the pairs: ``TaskSection``);
* evaluation prompts are held out of both SFT demonstrations and preference pairs.

Why rambling rather than wrong sums: a reward model has to *verify* a sum to rank wrong answers, and a
4-layer LoRA reward model stays at chance on that (measured: held-out pair accuracy ~0.5 after 1200
steps), while rambling is visible in the response itself and is learned in a few dozen steps.

Everything is a pure function of ``TaskSection`` (seeded), so datasets are reproducible and digestible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from stages.io.config import TaskSection

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


def rambling(problem: Problem, rng: random.Random, max_operand: int) -> str:
    """The right answer followed by chatter: one more (correct) equation, as the base model would write."""
    extra = Problem(rng.randint(0, max_operand), rng.randint(0, max_operand))
    return f"{problem.answer}{EQUATION_SEPARATOR}{extra.prompt}{extra.answer}"


def _split(cfg: TaskSection) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out evaluation problems), shuffled deterministically."""
    problems = [Problem(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_operand + 1)]
    random.Random(cfg.seed).shuffle(problems)
    return problems[cfg.num_eval :], problems[: cfg.num_eval]


def sft_records(cfg: TaskSection) -> list[dict[str, str]]:
    """Prompt/completion demonstrations; about ``1 - demo_accuracy`` of them ramble on purpose, and (the
    harder variant) ``wrong_answer_rate`` of them give a wrong sum, stopping or rambling alike."""
    rng = random.Random(cfg.seed + 1)
    wrong = random.Random(cfg.seed + 11)  # its own stream: the default task's demonstrations are unchanged
    train, _ = _split(cfg)
    records = []
    for _ in range(cfg.num_sft):
        problem = rng.choice(train)
        right = rng.random() < cfg.demo_accuracy
        completion = problem.answer if right else rambling(problem, rng, cfg.max_operand)
        if cfg.wrong_answer_rate and wrong.random() < cfg.wrong_answer_rate:
            completion = wrong_sum(problem, wrong) + completion.removeprefix(problem.answer)
        records.append({"prompt": problem.prompt, "completion": completion})
    return records


def wrong_sum(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer: the sum off by 1 or 2 (never negative)."""
    total = problem.a + problem.b
    return str(rng.choice([x for x in (total - 2, total - 1, total + 1, total + 2) if x >= 0]))


def preference_records(cfg: TaskSection) -> list[dict[str, str]]:
    """(prompt, chosen, rejected): the exact answer is chosen over a rambling one; (the harder variant) a
    ``label_noise`` share of the pairs has them swapped, as annotators err."""
    rng = random.Random(cfg.seed + 2)
    noise = random.Random(cfg.seed + 12)  # its own stream: the default task's pairs are unchanged
    train, _ = _split(cfg)
    records = []
    for _ in range(cfg.num_pairs):
        problem = rng.choice(train)
        chosen, rejected = problem.answer, rambling(problem, rng, cfg.max_operand)
        if cfg.label_noise and noise.random() < cfg.label_noise:
            chosen, rejected = rejected, chosen
        records.append({"prompt": problem.prompt, "chosen": chosen, "rejected": rejected})
    return records


def ranked_records(cfg: TaskSection) -> list[dict[str, object]]:
    """Offline RRHF groups in the reference format: the exact answer scores 1, rambling ones 0."""
    rng = random.Random(cfg.seed + 3)
    train, _ = _split(cfg)
    records: list[dict[str, object]] = []
    for _ in range(cfg.num_pairs):
        problem = rng.choice(train)
        responses = [problem.answer, rambling(problem, rng, cfg.max_operand), rambling(problem, rng, cfg.max_operand)]
        records.append({"query": problem.prompt, "responses": responses, "scores": [1.0, 0.0, 0.0]})
    return records


def prompt_records(cfg: TaskSection) -> list[dict[str, str]]:
    """The training problems' prompts (``data.prompts: builtin``), none held out for evaluation."""
    train, _ = _split(cfg)
    return [{"prompt": p.prompt} for p in train]


def eval_records(cfg: TaskSection) -> list[dict[str, str]]:
    """Held-out prompts with their reference answers."""
    _, held_out = _split(cfg)
    return [{"prompt": p.prompt, "answer": p.answer} for p in held_out]


def pretraining_lines(max_operand: int, seed: int, num_lines: int, equations_per_line: int) -> list[str]:
    """Streams of correct equations, ``"3+4=7;12+9=21;..."`` (the builder appends end-of-sequence)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        problems = [
            Problem(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(equations_per_line)
        ]
        lines.append(EQUATION_SEPARATOR.join(p.prompt + p.answer for p in problems) + EQUATION_SEPARATOR)
    return lines
