"""KL-coefficient controllers for PPO-based RLHF.

The KL coefficient ``beta`` scales the per-token penalty
``-beta * (log pi - log pi_ref)`` (see ``stages.objectives.losses.kl_penalized_rewards``).
A fixed beta is the simplest choice; the adaptive controller of Ziegler et al.
2019 (sec 2.2) steers the measured KL towards a target instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "KLController",
    "FixedKLController",
    "AdaptiveKLController",
    "KL_CONTROLLER_KINDS",
    "build_kl_controller",
]

# Immutable tuple, not a registry dict, to keep module state read-only.
KL_CONTROLLER_KINDS: tuple[str, ...] = ("fixed", "adaptive")


@runtime_checkable
class KLController(Protocol):
    """Interface shared by all controllers; PPO only relies on this."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass
class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op."""

    kl_coef: float
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        self.value = float(self.kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ignore the observed KL: the coefficient never changes."""
        del current_kl, n_steps

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_kind(state_dict, "fixed")
        self.value = float(state_dict["value"])


@dataclass
class AdaptiveKLController:
    """Proportional KL controller, Ziegler et al. 2019 sec 2.2.

    ``e = clip(KL / target - 1, -0.2, 0.2)``;
    ``beta <- beta * (1 + e * n_steps / horizon)``.
    The clip bounds how fast beta moves when KL is far from target, and
    ``n_steps / horizon`` makes the rate independent of the batch size.
    """

    init_kl_coef: float
    target: float
    horizon: int
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be > 0, got {self.init_kl_coef}")
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {self.horizon}")
        self.value = float(self.init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards the value that makes KL hit ``target``."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "adaptive",
            "value": self.value,
            "target": self.target,
            "horizon": self.horizon,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_kind(state_dict, "adaptive")
        self.value = float(state_dict["value"])
        self.target = float(state_dict["target"])
        self.horizon = int(state_dict["horizon"])


def _check_kind(state_dict: dict[str, Any], expected: str) -> None:
    """Refuse to restore a checkpoint written by a different controller type."""
    kind = state_dict.get("kind", expected)
    if kind != expected:
        raise ValueError(f"state_dict is for a {kind!r} controller, expected {expected!r}")


def build_kl_controller(
    kind: str,
    *,
    kl_coef: float,
    target: float | None = None,
    horizon: int | None = None,
) -> FixedKLController | AdaptiveKLController:
    """Build a controller by name.

    ``kl_coef`` is the (initial) coefficient; ``target`` and ``horizon`` are
    required for ``kind="adaptive"`` and ignored for ``"fixed"``.
    """
    if kind == "fixed":
        return FixedKLController(kl_coef=kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller requires both target and horizon")
        return AdaptiveKLController(init_kl_coef=kl_coef, target=target, horizon=horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; allowed kinds: {KL_CONTROLLER_KINDS}")
