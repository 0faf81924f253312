"""Tests for stages.objectives.kl_control (Ziegler et al. 2019 sec 2.2 adaptive KL)."""

from __future__ import annotations

import json

import pytest

from stages.objectives.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    build_kl_controller,
)


def test_fixed_controller_never_moves() -> None:
    ctl = FixedKLController(kl_coef=0.05)
    assert ctl.value == 0.05
    ctl.update(current_kl=100.0, n_steps=256)
    ctl.update(current_kl=0.0, n_steps=256)
    assert ctl.value == 0.05
    assert isinstance(ctl, KLController)


def test_adaptive_moves_up_when_kl_above_target() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # e = clip(6.6 / 6 - 1, -0.2, 0.2) = 0.1 (not clipped); mult = 1 + 0.1 * 256 / 10000 = 1.00256
    ctl.update(current_kl=6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * 1.00256)


def test_adaptive_moves_down_when_kl_below_target() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # e = 5.4 / 6 - 1 = -0.1; mult = 1 - 0.1 * 256 / 10000 = 0.99744
    ctl.update(current_kl=5.4, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * 0.99744)


def test_adaptive_error_is_clipped_at_0_2() -> None:
    hi = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    hi.update(current_kl=9.0, n_steps=256)  # e = 0.5 -> 0.2; mult = 1.00512
    assert hi.value == pytest.approx(0.100512)
    very_hi = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    very_hi.update(current_kl=600.0, n_steps=256)  # e = 99 -> 0.2
    assert very_hi.value == pytest.approx(0.100512)

    lo = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    lo.update(current_kl=0.0, n_steps=256)  # e = -1 -> -0.2; mult = 0.99488
    assert lo.value == pytest.approx(0.099488)


def test_adaptive_at_target_and_zero_steps_is_unchanged() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    ctl.update(current_kl=6.0, n_steps=256)
    ctl.update(current_kl=50.0, n_steps=0)
    assert ctl.value == pytest.approx(0.2)


def test_adaptive_updates_compound() -> None:
    ctl = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=100)
    ctl.update(current_kl=2.0, n_steps=50)  # e 0.2 -> * 1.1
    ctl.update(current_kl=2.0, n_steps=50)  # * 1.1
    ctl.update(current_kl=0.95, n_steps=100)  # e -0.05 -> * 0.95
    assert ctl.value == pytest.approx(1.1 * 1.1 * 0.95)


def test_adaptive_state_dict_round_trip() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    for kl in (9.0, 7.0, 2.0):
        ctl.update(current_kl=kl, n_steps=512)
    state = json.loads(json.dumps(ctl.state_dict()))  # must survive serialisation

    resumed = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1)
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value
    assert (resumed.target, resumed.horizon) == (6.0, 10_000)
    ctl.update(current_kl=8.0, n_steps=512)
    resumed.update(current_kl=8.0, n_steps=512)
    assert resumed.value == ctl.value


def test_fixed_state_dict_round_trip_and_kind_check() -> None:
    fixed = FixedKLController(kl_coef=0.3)
    other = FixedKLController(kl_coef=0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3

    adaptive = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    with pytest.raises(ValueError, match="adaptive"):
        fixed.load_state_dict(adaptive.state_dict())


def test_adaptive_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        AdaptiveKLController(init_kl_coef=0.1, target=0.0, horizon=10_000)
    with pytest.raises(ValueError):
        AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError):
        AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10).update(1.0, n_steps=-1)


def test_build_kl_controller() -> None:
    fixed = build_kl_controller("fixed", kl_coef=0.05)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = build_kl_controller("adaptive", kl_coef=0.1, target=6.0, horizon=10_000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 10_000)

    with pytest.raises(ValueError, match="fixed.*adaptive"):
        build_kl_controller("pid", kl_coef=0.1)
    with pytest.raises(ValueError, match="target"):
        build_kl_controller("adaptive", kl_coef=0.1)
