"""The grammar of a promotion gate's conditions (``gate.conditions``; decided in ``flows.promotion``).

A condition compares one of this run's final metrics with a number or with the champion's value::

    ppo.task_score >= 0.8
    reward.pair_accuracy >= champion                      # the champion's reward.pair_accuracy
    ppo.task_score >= champion.ppo.task_score - 0.02      # a named metric of the champion, with a margin
    ppo.kl_to_reference <= champion + 0.5

The champion (chosen in ``flows.promotion``) is the latest promoted run that finished the stage the
reference names. Without one, a champion condition is not checked (``passed`` is None, with the reason)
and the gate decides by the rest.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

_OPERATORS = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
CHAMPION = "champion"
_NAME = r"[A-Za-z_][\w-]*"
_METRIC = r"[A-Za-z_]\w*"
_CONDITION = re.compile(rf"^\s*({_NAME})\.({_METRIC})\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
_CHAMPION_SIDE = re.compile(rf"^{CHAMPION}(?:\.({_NAME})\.({_METRIC}))?\s*(?:([+-])\s*(\S+))?$")
_FORM = (
    "expected STAGE.METRIC OP NUMBER or STAGE.METRIC OP champion[.STAGE.METRIC] [+|- NUMBER], with OP one of "
    f"{' '.join(_OPERATORS)}, e.g. 'ppo.task_score >= 0.8' or 'ppo.task_score >= champion - 0.02'"
)


@dataclass(frozen=True)
class ChampionRef:
    """The right side ``champion.STAGE.METRIC + offset``: the champion's value of ``stage.metric``, shifted."""

    stage: str
    metric: str
    offset: float = 0.0


@dataclass(frozen=True)
class Champion:
    """The run a champion condition compares with: its id and its stages' final metrics."""

    run_id: str
    metrics: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Condition:
    """``stage.metric OP threshold``, e.g. ``reward.pair_accuracy >= 0.9``, or ``OP champion...`` (``champion``
    set, ``threshold`` then unused)."""

    stage: str
    metric: str
    op: str
    threshold: float
    written: str = ""  # the right side as written, so messages quote it as the config does
    champion: ChampionRef | None = None

    @classmethod
    def parse(cls, text: str) -> Condition:
        """Raises ``ValueError`` naming the condition and the expected form."""
        match = _CONDITION.match(text)
        if match is None:
            raise ValueError(f"{text!r}: {_FORM}")
        stage, metric, op, right = match.groups()
        if right.startswith(CHAMPION):
            return cls(stage, metric, op, 0.0, right, _champion_side(text, right, stage, metric))
        return cls(stage, metric, op, _finite(text, right), right)

    def __str__(self) -> str:
        return f"{self.stage}.{self.metric} {self.op} {self.written or format(self.threshold, 'g')}"

    def check(self, metrics: dict[str, dict[str, Any]], champion: Champion | None = None) -> dict[str, Any]:
        """The condition against each stage's final metrics: ``{condition, value, passed, threshold[, reason]}``;
        a champion condition has ``champion: {run_id, value}`` and the ``threshold`` it compared with (the
        champion's value, shifted), or, with no ``champion``, ``passed`` None and the reason (not checked)."""
        value, reason = _metric(metrics, self.stage, self.metric, "")
        result: dict[str, Any] = {"condition": str(self), "value": value, "passed": False}
        threshold = self.threshold
        if self.champion is None:
            result["threshold"] = threshold
        else:
            ref = self.champion
            if champion is None:
                reason = f"no champion: no promoted run has finished stage {ref.stage}, so this is not checked"
                return {**result, "passed": None, "reason": reason}
            theirs, their_reason = _metric(champion.metrics, ref.stage, ref.metric, f"champion {champion.run_id}: ")
            result["champion"] = {"run_id": champion.run_id, "value": theirs}
            if theirs is None:
                return {**result, "reason": their_reason}
            threshold = theirs + ref.offset  # compared as is: with no margin, a run equal to its champion passes
            result["threshold"] = round(threshold, 12)  # shown as 0.68, not 0.6799999999999999
        if value is None:
            return {**result, "reason": reason}
        return {**result, "passed": bool(_OPERATORS[self.op](value, threshold))}


def _metric(metrics: dict[str, dict[str, Any]], stage: str, metric: str, whose: str) -> tuple[float | None, str]:
    """A finite numeric final metric, or None and why not."""
    found = metrics.get(stage, {})
    value = found.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        numeric = sorted(k for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        reason = (
            f"{whose}{stage} has no finished metrics"
            if not found
            else f"{whose}{stage} has no numeric metric {metric!r}; it has {', '.join(numeric)}"
        )
        return None, reason
    if not math.isfinite(value):  # a diverged metric passes no gate, not even a != condition
        return None, f"{whose}{stage}.{metric} is {value}, not a finite number"
    return float(value) if isinstance(value, float) else value, ""


def _finite(text: str, written: str) -> float:
    try:
        number = float(written)
    except ValueError:
        raise ValueError(f"{text!r}: {_FORM}") from None
    if not math.isfinite(number):  # nan: every comparison but != is false; inf: >= and <= decide nothing
        raise ValueError(
            f"{text!r}: the threshold {written} is not a finite number, so the condition "
            "cannot tell a good run from a bad one; write a finite NUMBER"
        )
    return number


def _champion_side(text: str, right: str, stage: str, metric: str) -> ChampionRef:
    match = _CHAMPION_SIDE.match(right)
    if match is None:
        raise ValueError(f"{text!r}: {_FORM}")
    their_stage, their_metric, sign, margin = match.groups()
    if margin is not None and margin[0] in "+-":  # 'champion - -0.02' would silently mean + 0.02
        raise ValueError(f"{text!r}: write the margin as an unsigned number after + or -, e.g. 'champion - 0.02'")
    offset = _finite(text, margin) if margin is not None else 0.0
    return ChampionRef(their_stage or stage, their_metric or metric, -offset if sign == "-" else offset)
