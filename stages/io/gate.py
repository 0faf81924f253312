"""The grammar of a promotion gate's conditions (``gate.conditions``; decided in ``flows.promotion``)."""

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
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w-]*)\.([A-Za-z_]\w*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Condition:
    """``stage.metric OP threshold``, e.g. ``reward.pair_accuracy >= 0.9``."""

    stage: str
    metric: str
    op: str
    threshold: float
    written: str = ""  # the threshold as written, so messages quote it as the config does

    @classmethod
    def parse(cls, text: str) -> Condition:
        """Raises ``ValueError`` naming the condition and the expected form."""
        match = _CONDITION.match(text)
        try:
            threshold = float(match.group(4)) if match else None
        except ValueError:
            threshold = None
        if match is None or threshold is None:
            raise ValueError(
                f"{text!r}: expected STAGE.METRIC OP NUMBER with OP one of {' '.join(_OPERATORS)}, "
                "e.g. 'ppo.task_score >= 0.8'"
            )
        if not math.isfinite(threshold):  # nan: every comparison but != is false; inf: >= and <= decide nothing
            raise ValueError(
                f"{text!r}: the threshold {match.group(4)} is not a finite number, so the condition "
                "cannot tell a good run from a bad one; write a finite NUMBER"
            )
        return cls(match.group(1), match.group(2), match.group(3), threshold, match.group(4))

    def __str__(self) -> str:
        return f"{self.stage}.{self.metric} {self.op} {self.written or format(self.threshold, 'g')}"

    def check(self, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The condition against each stage's final metrics: ``{condition, value, passed[, reason]}``."""
        found = metrics.get(self.stage, {})
        value = found.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            numeric = sorted(k for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            reason = (
                f"{self.stage} has no finished metrics"
                if not found
                else f"{self.stage} has no numeric metric {self.metric!r}; it has {', '.join(numeric)}"
            )
            return {"condition": str(self), "value": None, "passed": False, "reason": reason}
        if not math.isfinite(value):  # a diverged metric passes no gate, not even a != condition
            return {
                "condition": str(self),
                "value": None,
                "passed": False,
                "reason": f"{self.stage}.{self.metric} is {value}, not a finite number",
            }
        return {"condition": str(self), "value": value, "passed": bool(_OPERATORS[self.op](value, self.threshold))}
