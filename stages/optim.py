"""The optimiser of our own training loops (reward, RRHF, PPO): AdamW, warmup + cosine, clipping,
gradient accumulation, a finite-loss guard, and checkpointable state - locally or on a DeepSpeed engine.

``step(loss)`` is one micro-step. Locally it backpropagates ``loss / accumulation`` and updates every
``accumulation`` micro-steps. Under ``launcher: accelerate`` the trainable module is wrapped by a
DeepSpeed engine through accelerate, which does the same (accumulation, clipping, AdamW, schedule) with
ZeRO-partitioned gradients and optimizer state; DeepSpeed updates inside ``backward``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from stages.distributed import LOCAL, Distributed, filled_deepspeed_config

if TYPE_CHECKING:
    import torch

LOCAL_STATE = "optimizer.pt"
ENGINE_TAG = "engine"


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite loss: training stops before the update, so the last checkpoint stays good."""


class Optimizer:
    """AdamW over the trainable parameters of ``module`` with linear warmup then cosine decay."""

    def __init__(self, module: "torch.nn.Module", learning_rate: float, warmup_steps: int, total_steps: int,
                 max_grad_norm: float = 1.0, *, gradient_accumulation: int = 1, micro_batch_size: int = 1,
                 schedule: str = "cosine", dist: Distributed = LOCAL, bf16: bool = False) -> None:
        import torch
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.accumulation = gradient_accumulation
        self.micro_steps = 0
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=0.0)
        self.schedule = (get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
                         if schedule == "cosine" else get_constant_schedule_with_warmup(self.optimizer, warmup_steps))
        self.engine = None
        if dist.deepspeed is not None:
            from accelerate import Accelerator, DeepSpeedPlugin

            config = filled_deepspeed_config(dist, micro_batch_size=micro_batch_size,
                                             gradient_accumulation=gradient_accumulation,
                                             max_grad_norm=max_grad_norm, bf16=bf16)
            self.accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
            self.engine, self.optimizer, self.schedule = self.accelerator.prepare(module, self.optimizer, self.schedule)
            if type(self.engine).__name__ != "DeepSpeedEngine":  # never train on something else by accident
                raise RuntimeError(f"accelerate prepared a {type(self.engine).__name__}, not the configured {dist.engine}")

    def step(self, loss: "torch.Tensor", what: str = "loss") -> None:
        """One micro-step; refuses a non-finite loss before it touches any weight."""
        self.check_finite(loss, what)
        if self.engine is not None:
            self.accelerator.backward(loss)  # DeepSpeed: scales by 1/accumulation, updates at the boundary
            return
        self.backward(loss)
        self.finish_micro_step()

    def backward(self, loss: "torch.Tensor") -> None:
        """Local only: accumulate the gradient of one of several losses of this micro-step."""
        (loss / self.accumulation).backward()

    def finish_micro_step(self, boundary: bool = False) -> None:
        """Local only: update after ``accumulation`` micro-steps (or at an explicit boundary)."""
        import torch

        self.micro_steps += 1
        if self.micro_steps % self.accumulation and not boundary:
            return
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps = 0

    def check_finite(self, loss: "torch.Tensor", what: str) -> None:
        value = loss.detach().float().item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{what} is {value} at micro-step {self.micro_steps + 1}: stopped before the update "
                                "(lower the learning rate, or check the data); the last checkpoint is kept")

    def save(self, folder: Path) -> None:
        """Optimizer and schedule state (every rank writes its ZeRO partition under DeepSpeed)."""
        import torch

        if self.engine is not None:
            self.engine.save_checkpoint(str(folder), tag=ENGINE_TAG, exclude_frozen_parameters=True)
        else:
            torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()},
                       Path(folder) / LOCAL_STATE)

    def load(self, folder: Path) -> None:
        import torch

        if self.engine is not None:
            self.engine.load_checkpoint(str(folder), tag=ENGINE_TAG, load_module_strict=False)
        else:
            state = torch.load(Path(folder) / LOCAL_STATE, weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
