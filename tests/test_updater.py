"""The Updater's local path at a non-default ``gradient_accumulation`` (``ppo.gradient_accumulation``):
PPO's two losses per micro-step (``add_loss`` twice, then ``finish_micro_step``) update exactly like one
``step`` of their sum, only every ``accumulation`` micro-steps, or at once at an explicit boundary.
The DeepSpeed path is compared with this one in tests/test_deepspeed.py."""

import pytest
import torch

from stages.training.updater import NonFiniteLoss, Updater

INPUTS = torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(1))  # (micro-steps, batch, features)


def _weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _trace(two_losses: bool, accumulation: int, boundary_at: int | None = None) -> list[torch.Tensor]:
    """Weights after each micro-step of a fixed problem."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    updater = Updater(
        module, 0.1, warmup_steps=0, total_steps=10, gradient_accumulation=accumulation, schedule="constant"
    )
    trace = []
    for micro, x in enumerate(INPUTS):
        boundary = micro == boundary_at
        if two_losses:  # each loss from its own forward, as PPO's policy and value losses are
            updater.add_loss(module(x).pow(2).mean(), "first")
            updater.add_loss(0.5 * (module(x) - 1).abs().mean(), "second")
            updater.finish_micro_step(boundary)
        else:
            out = module(x)
            updater.step(out.pow(2).mean() + 0.5 * (out - 1).abs().mean(), boundary=boundary)
        trace.append(_weights(module))
    return trace


def test_two_losses_accumulate_like_one_step_of_their_sum() -> None:
    two, one = _trace(True, accumulation=2), _trace(False, accumulation=2)
    for a, b in zip(two, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    start = _weights(torch.nn.Linear(3, 1))  # the module _trace builds, before any update
    assert torch.equal(two[0], start) and not torch.equal(two[1], two[0])  # updates only every 2nd micro-step
    assert torch.equal(two[2], two[1]) and not torch.equal(two[3], two[2])


def test_an_explicit_boundary_updates_at_once_and_a_non_finite_loss_stops_before_it() -> None:
    early = _trace(True, accumulation=2, boundary_at=0)
    assert not torch.equal(early[0], _trace(True, accumulation=2)[0])  # the boundary forced an update
    module = torch.nn.Linear(3, 1)
    updater = Updater(module, 0.1, warmup_steps=0, total_steps=10, gradient_accumulation=2)
    before = _weights(module)
    with pytest.raises(NonFiniteLoss, match="second is nan"):
        updater.add_loss(module(INPUTS[0]).mean(), "first")
        updater.add_loss(module(INPUTS[0]).mean() * float("nan"), "second")
    assert torch.equal(_weights(module), before)
