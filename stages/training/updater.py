"""The parameter updates of our own training loops (reward, RRHF, PPO): AdamW, warmup + cosine, clipping,
gradient accumulation, a finite-loss guard, and checkpointable state - locally or on a DeepSpeed engine.

``step(loss)`` is one micro-step; every ``accumulation`` micro-steps (or at an explicit ``boundary``)
it updates the weights. Locally it backpropagates ``loss / accumulation`` and steps AdamW. Under
``launcher: accelerate`` the trainable module is wrapped by a DeepSpeed engine (prepared by accelerate),
which reduces ZeRO-partitioned gradients, clips and steps; we drive it directly - ``backward`` then
``step`` with the accumulation boundary set by us - and we step the learning-rate schedule ourselves and
write its value into the optimizer the engine actually steps. accelerate's ``backward`` must not be used
here: it marks every micro-step a boundary (no accumulation), and the schedule it hands back for a
non-DeepSpeed scheduler is never stepped by the engine, so a warmup schedule kept the learning rate at
exactly 0 for the whole run (docs/architecture.md, "How our loops drive DeepSpeed").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from stages.training.distributed import LOCAL, Distributed, filled_deepspeed_config

if TYPE_CHECKING:
    from stages.model.adapters import RankAllocation

LOCAL_STATE = "optimizer.pt"
SCHEDULE_STATE = "schedule.pt"  # under DeepSpeed: our schedule, which the engine's checkpoint does not hold
ENGINE_TAG = "engine"


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite loss: training stops before the update, so the last checkpoint stays good."""


class Updater:
    """AdamW over the trainable parameters of ``module`` with linear warmup then cosine decay (or constant).

    The schedule follows the HF Trainer's convention: update ``n`` (0-based) uses
    ``learning_rate * schedule(n)``, so with warmup the first update has learning rate 0.
    ``applied_lr`` is the learning rate the last update really used, read back from the optimizer that
    stepped (the engine's, under DeepSpeed): the loops log it, so a schedule that never moves is visible.
    ``rank_allocation`` (a fresh AdaLoRA adapter's, ``RankAllocation.of``) runs after every local update,
    before the gradients it reads are zeroed, and is saved with the optimizer.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        learning_rate: float,
        warmup_steps: int,
        total_steps: int,
        max_grad_norm: float = 1.0,
        *,
        gradient_accumulation: int = 1,
        micro_batch_size: int = 1,
        schedule: str = "cosine",
        dist: Distributed = LOCAL,
        bf16: bool = False,
        rank_allocation: RankAllocation | None = None,
    ) -> None:
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.accumulation = gradient_accumulation
        self.micro_steps = 0
        self.applied_lr = 0.0
        self.dist = dist
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=0.0)
        self.schedule = (
            get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
            if schedule == "cosine"
            else get_constant_schedule_with_warmup(self.optimizer, warmup_steps)
        )
        self.rank_allocation = rank_allocation
        self.engine = None
        self._pending: torch.Tensor | None = None  # DeepSpeed: this micro-step's losses, summed
        if dist.deepspeed is not None:
            from accelerate import Accelerator, DeepSpeedPlugin

            config = filled_deepspeed_config(
                dist,
                micro_batch_size=micro_batch_size,
                gradient_accumulation=gradient_accumulation,
                max_grad_norm=max_grad_norm,
                bf16=bf16,
            )
            accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
            # Only the module and the optimizer go to the engine; the schedule stays ours (module docstring).
            self.engine, _ = accelerator.prepare(module, self.optimizer)
            if type(self.engine).__name__ != "DeepSpeedEngine":  # never train on something else by accident
                raise RuntimeError(
                    f"accelerate prepared a {type(self.engine).__name__}, not the configured {dist.engine}"
                )
            if rank_allocation is not None:  # config validation refuses it first; this guards direct use
                raise RuntimeError("AdaLoRA's rank allocation reads full gradients, which DeepSpeed partitions")

    def step(self, loss: torch.Tensor, what: str = "loss", *, boundary: bool = False) -> None:
        """One micro-step of ``loss`` (refused if not finite, before it touches any weight); updates after
        ``accumulation`` micro-steps, or now if ``boundary`` (e.g. the last minibatch of a PPO epoch)."""
        self.add_loss(loss, what)
        self.finish_micro_step(boundary)

    def add_loss(self, loss: torch.Tensor, what: str = "loss") -> None:
        """One of several losses of this micro-step (PPO's policy and value losses), refused if not finite.

        Locally its gradient is taken at once, so only one autograd graph over the shared backbone is
        alive at a time (the same gradients as one backward of the sum). ZeRO reduces each parameter's
        gradient once per micro-step, during the backward, so under DeepSpeed the losses are summed and
        take one backward in ``finish_micro_step``.
        """
        try:
            self.check_finite(loss, what)
        except NonFiniteLoss:
            self._pending = None  # nothing of this micro-step reaches the weights
            raise
        if self.engine is None:
            (loss / self.accumulation).backward()
        else:
            self._pending = loss if self._pending is None else self._pending + loss

    def finish_micro_step(self, boundary: bool = False) -> None:
        """End the micro-step; update after ``accumulation`` micro-steps (or at an explicit ``boundary``)."""
        self.micro_steps += 1
        update = boundary or self.micro_steps % self.accumulation == 0
        if self.engine is not None:
            loss, self._pending = self._pending, None
            if loss is None:
                raise RuntimeError("finish_micro_step without a loss: call add_loss first")
            self.engine.set_gradient_accumulation_boundary(update)  # before backward: ZeRO reduces at the boundary
            self.engine.backward(loss)  # divides by gradient_accumulation_steps, as the local path does
            if update:
                self._set_engine_lr()
            self.engine.step()  # clips, steps AdamW and zeroes the gradients only at the boundary
        elif update:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            if self.rank_allocation is not None:
                self.rank_allocation.after_update(self.schedule.last_epoch + 1)  # 1-based, as PEFT counts
            self.optimizer.zero_grad(set_to_none=True)
        if update:
            self._after_update()

    def _stepping_param_groups(self) -> list[dict]:
        """The param groups of the optimizer that really updates the weights (ZeRO's wraps ours or a copy)."""
        return self.engine.optimizer.param_groups if self.engine is not None else self.optimizer.param_groups

    def _set_engine_lr(self) -> None:
        """Write our schedule's learning rate into the engine's optimizer (with ``offload_optimizer`` and
        ``zero_force_ds_cpu_optimizer``, accelerate swaps in DeepSpeed's CPU Adam, which ours never reaches)."""
        for group, lr in zip(self._stepping_param_groups(), self.schedule.get_last_lr(), strict=False):
            group["lr"] = lr

    def _after_update(self) -> None:
        self.applied_lr = float(self._stepping_param_groups()[0]["lr"])
        self.schedule.step()
        self.micro_steps = 0

    def check_finite(self, loss: torch.Tensor, what: str) -> None:
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"{what} is {value} at micro-step {self.micro_steps + 1}: stopped before the update "
                "(lower the learning rate, or check the data); the last checkpoint is kept"
            )

    def save(self, folder: Path) -> None:
        """Optimizer and schedule state (every rank writes its ZeRO partition under DeepSpeed)."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder), tag=ENGINE_TAG, exclude_frozen_parameters=True)
            if self.dist.is_main:
                torch.save(
                    {"schedule": self.schedule.state_dict(), "applied_lr": self.applied_lr},
                    Path(folder) / SCHEDULE_STATE,
                )
        else:
            allocation = self.rank_allocation.state_dict() if self.rank_allocation is not None else None
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "applied_lr": self.applied_lr,
                    "rank_allocation": allocation,
                },
                Path(folder) / LOCAL_STATE,
            )

    def load(self, folder: Path) -> None:
        """Restore what ``save`` wrote (checkpoints are keyed by code version: never an older layout)."""
        if self.engine is not None:
            self.engine.load_checkpoint(
                str(folder), tag=ENGINE_TAG, load_module_strict=False, load_lr_scheduler_states=False
            )
            state = torch.load(Path(folder) / SCHEDULE_STATE, weights_only=True)
        else:
            state = torch.load(Path(folder) / LOCAL_STATE, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.rank_allocation is not None:
                self.rank_allocation.load_state_dict(state["rank_allocation"])
        self.schedule.load_state_dict(state["schedule"])
        self.applied_lr = state["applied_lr"]  # the next logged row may come before the next update
