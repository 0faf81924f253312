"""The global-batch arithmetic of a 2-rank job, on a real gloo process group: each rank's share of an
uneven batch must give exactly what one process computes on the whole batch."""

from pathlib import Path

import torch
import torch.distributed
import torch.multiprocessing

from stages.objectives.losses import masked_mean, masked_whiten
from stages.training.distributed import Distributed

ROWS = slice(0, 2), slice(2, 7)  # rank 0 holds 2 rows, rank 1 holds 5: uneven on purpose


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(7, 5, generator=generator)
    mask = (torch.rand(7, 5, generator=generator) > 0.3).float()
    return values, mask


def _rank(rank: int, store: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dist = Distributed(rank=rank, world_size=2)
    values, mask = (t[ROWS[rank]] for t in _batch())
    whitened = masked_whiten(values, mask, total=dist.total)
    # What DeepSpeed applies: the mean over ranks of each rank's (weighted) loss.
    weighted_mean = dist.mean((dist.share_of_global_mean(mask.sum()) * masked_mean(values, mask)).item())
    items = list("abcdefg")  # 7 items over 2 ranks: shares of 4 and 3
    unsharded = dist.unshard([item.upper() for item in dist.shard(items)])
    torch.save({"whitened": whitened, "weighted_mean": weighted_mean, "unsharded": unsharded}, f"{results}-{rank}.pt")
    dist.close()  # waits for the other rank, then leaves: the group is gone
    assert not torch.distributed.is_initialized()


def test_two_ranks_whiten_and_average_like_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """... and every rank's share of a list, unsharded, is the whole list in its order on every rank (RRHF's
    candidate groups, sampled per rank, are then drawn from as a local run draws them)."""
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    parts = [torch.load(tmp_path / f"out-{rank}.pt") for rank in range(2)]
    values, mask = _batch()
    torch.testing.assert_close(torch.cat([p["whitened"] for p in parts]), masked_whiten(values, mask))
    for part in parts:
        assert abs(part["weighted_mean"] - masked_mean(values, mask).item()) < 1e-6
        assert part["unsharded"] == list("ABCDEFG")
    # The plain mean of the two ranks' means is NOT the global token mean on this uneven batch.
    naive = sum(masked_mean(values[r], mask[r]).item() for r in ROWS) / 2
    assert abs(naive - masked_mean(values, mask).item()) > 1e-3


def test_ranks_draw_equal_shares_or_are_refused() -> None:
    """Unequal shares would make ranks loop (and call the collectives) a different number of times."""
    import pytest

    from stages.io.config import ConfigError

    two = Distributed(rank=0, world_size=2)
    assert two.even_count(8, 100, "x") == 16 and two.even_count(8, 7, "x") == 6
    assert Distributed(rank=0, world_size=1).even_count(8, 7, "x") == 7
    with pytest.raises(ConfigError, match="grpo rollout prompts: 1 item\\(s\\) cannot be shared by 2 ranks"):
        two.even_count(8, 1, "grpo rollout prompts")
