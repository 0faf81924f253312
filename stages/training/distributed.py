"""The stage process's place in a run: one local process, or one rank of an ``accelerate launch`` job.

Every stage asks the same questions - am I the main rank (who writes files and logs), which share of
the data is mine, what do the other ranks see - and gets the trivial answers when it runs locally, so
stage code has no ``if distributed`` around its ordinary work.

On a CPU-only machine accelerate does not pick a backend for DeepSpeed by itself (its state says one
process even though DeepSpeed formed a group of two), and ``TrainingArguments(use_cpu=True)`` silently
turns DeepSpeed into plain DDP. Initialising accelerate's shared state with the ``gloo`` backend first
gives a real ZeRO engine on every rank; ``Distributed.engine`` names it in every manifest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed

from stages.io.config import ConfigError, PipelineConfig
from stages.io.deepspeed_config import deepspeed_config_path, is_distributed_process, load_deepspeed_config, zero_stage
from stages.io.devices import device_type

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    deepspeed: dict[str, Any] | None = None  # the resolved DeepSpeed config; None for the local launcher
    device: str = "cpu"  # where collectives' tensors live: the rank's GPU under NCCL, the CPU under gloo

    @property
    def engine(self) -> str:
        """What trains: "local" or "deepspeed-zero<N>"."""
        return "local" if self.deepspeed is None else f"deepspeed-zero{self.zero_stage}"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.deepspeed) if self.deepspeed is not None else 0

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of ``items`` (every rank sees the same list in the same order)."""
        return items[self.rank :: self.world_size]

    def even_count(self, per_rank: int, available: int, what: str) -> int:
        """How many of ``available`` items to draw so that every rank gets the same number, at most
        ``per_rank``: ranks that loop over unequal shares would call the collectives a different number
        of times and hang. Raises ConfigError when there are fewer items than ranks."""
        count = self.world_size * min(per_rank, available // self.world_size)
        if count == 0:
            raise ConfigError(
                f"{what}: {available} item(s) cannot be shared by {self.world_size} ranks; add data "
                "or lower distributed.num_processes"
            )
        return count

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed

            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the job: wait for every rank, then destroy the process group.

        A rank that exits with its group still alive tears gloo's (and DeepSpeed's shared-memory) comm
        threads down during interpreter shutdown, which can abort it with "terminate called without an
        active exception" (SIGABRT, exit status -6) after a stage that succeeded. Call it once, on the
        success path only: a barrier on a path where another rank failed would wait forever.
        """
        if self.world_size == 1:
            return

        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.item() / self.world_size

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks, detached (``tensor`` itself is never modified)."""
        if self.world_size == 1:
            return tensor.detach()

        summed = tensor.detach().clone()
        torch.distributed.all_reduce(summed)
        return summed

    def share_of_global_mean(
        self, count: torch.Tensor, window: torch.Tensor | None = None, accumulation: int = 1
    ) -> float:
        """Factor turning this rank's mean over its ``count`` items into its part of the global mean.

        DeepSpeed averages the ranks' gradients; a rank's mean over its own tokens, times this factor
        (``count * world_size / global count``), makes that average the gradient of the mean over every
        rank's tokens - what one process would compute on the whole global batch. 1.0 locally.

        With gradient accumulation, ``window`` is this rank's count over every micro-step of the update
        and ``accumulation`` what the updater divides each micro-step's loss by: the factor
        ``count * world_size * accumulation / global window count`` then weighs each micro-batch by its
        tokens, so the update is the token mean over the whole window, as one micro-batch of it all would
        give (the HF gradient-accumulation fix of Oct 2024; a plain mean of micro-batch means is not).
        """
        if window is None and accumulation == 1 and self.world_size == 1:
            return 1.0
        window = count if window is None else window
        return float(count) * self.world_size * accumulation / max(float(self.total(window.float())), 1.0)

    def gather(self, values: list[T]) -> list[T]:
        """Every rank's ``values`` concatenated in rank order, on every rank."""
        if self.world_size == 1:
            return list(values)

        gathered: list[list[T]] = [[] for _ in range(self.world_size)]
        torch.distributed.all_gather_object(gathered, list(values))
        return [value for part in gathered for value in part]

    def unshard(self, share: list[T]) -> list[T]:
        """The inverse of ``shard``: every rank's share, gathered, back in the global order on every rank
        (item i came from rank i % world_size), so what follows sees the list a local run sees."""
        if self.world_size == 1:
            return list(share)

        gathered: list[list[T]] = [[] for _ in range(self.world_size)]
        torch.distributed.all_gather_object(gathered, list(share))
        total = sum(len(part) for part in gathered)
        return [gathered[i % self.world_size][i // self.world_size] for i in range(total)]


LOCAL = Distributed()


def setup_distributed(cfg: PipelineConfig, stage: str) -> Distributed:
    """Join the launched job for a stage with ``launcher: accelerate``; a local stage gets ``LOCAL``."""
    if cfg.launcher(stage) == "local":
        return LOCAL
    if not is_distributed_process():
        raise ConfigError(
            f"{stage}.launcher: accelerate, but this process was not started by `accelerate launch`; run the "
            f"stage through `rlhf run`/`rlhf stage`, or set {stage}.launcher=local"
        )
    from accelerate import PartialState

    cuda = device_type(cfg.backbone) == "cuda"
    state = PartialState(backend=None if cuda else "gloo")  # None: accelerate's own choice on GPUs (NCCL)
    dist = Distributed(
        rank=state.process_index,
        world_size=state.num_processes,
        deepspeed=load_deepspeed_config(cfg.distributed),
        device=str(state.device),
    )
    _validate_deepspeed_config(dist, cfg)
    return dist


def _validate_deepspeed_config(dist: Distributed, cfg: PipelineConfig) -> None:
    """Let DeepSpeed parse the config now, so a bad key is one line naming it, not a trace from every rank."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    source = f"distributed.deepspeed: {deepspeed_config_path(cfg.distributed)}"

    def pinned_or(key: str, default: Any) -> Any:  # the stage's own values are checked when it builds its engine
        return default if dist.deepspeed.get(key, "auto") == "auto" else dist.deepspeed[key]

    try:
        DeepSpeedConfig(
            filled_deepspeed_config(
                dist,
                micro_batch_size=pinned_or("train_micro_batch_size_per_gpu", 1),
                gradient_accumulation=pinned_or("gradient_accumulation_steps", 1),
                max_grad_norm=pinned_or("gradient_clipping", 1.0),
                bf16=False,
            )
        )
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{source}: DeepSpeed rejects it: {problems}") from None
    except (AssertionError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{source}: DeepSpeed rejects it: {err}") from None


def filled_deepspeed_config(
    dist: Distributed, *, micro_batch_size: int, gradient_accumulation: int, max_grad_norm: float, bf16: bool
) -> dict[str, Any]:
    """The DeepSpeed config with its ``"auto"`` values resolved from the stage's own settings.

    A value the JSON pins must equal the stage's: our loops (and the HF Trainer) feed the engine their
    own batches, divide the loss by their own accumulation and log their own clipping, so a differing
    pinned value would silently train differently from ``launcher: local``.

    Raises:
        ConfigError: a pinned value differs from the stage setting it stands for (named in the message).
    """
    assert dist.deepspeed is not None
    config = dict(dist.deepspeed)
    resolved = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in resolved.items():
        pinned = config.get(key, "auto")
        if pinned != "auto" and pinned != value:
            raise ConfigError(
                f"distributed.deepspeed: {key} is {pinned!r} in the DeepSpeed config, but the stage "
                f'uses {value!r}; set it to "auto" (the stage\'s own setting decides)'
            )
        config[key] = value
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    for precision, enabled in (("bf16", bf16), ("fp16", False)):
        section = dict(config.get(precision) or {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
        config[precision] = section
    return config


def synced_generation(dist: Distributed) -> bool:
    """ZeRO-3 shards the weights generation needs: every rank must take part in every forward."""
    return dist.zero_stage == 3


@contextmanager
def gathered(dist: Distributed, module: torch.nn.Module, also: Iterable[torch.nn.Parameter] = ()) -> Iterator[None]:
    """Under ZeRO-3, make the trainable weights (and the frozen ones in ``also``, saved with them, such as
    the reward head's bias) whole on every rank for the block (to save them)."""
    if dist.zero_stage != 3:
        yield
        return
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad] + list(also)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
