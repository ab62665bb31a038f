"""Collection across processes and machines with torch.distributed (launched by torchrun).

Every rank forms the same batches as a single process would (same windows, same length grouping);
rank r runs batches r, r + w, r + 2w, ... of a world of w processes, accumulates its own sums and
counts, and the partial results are added:

    sum[site]   = Σ_r sum_r[site]     float64 all_reduce (equal to one process up to float64 rounding)
    count[site] = Σ_r count_r[site]   int64 all_reduce (exact)
    sequences, tokens                 int64 all_reduce (exact)

Rank 0 alone writes the store. Backend: nccl when the model runs on CUDA, gloo on CPU.
Any rank's user error is shared with all ranks at agreement points (`agree`), so that no rank
waits forever on a peer that gave up.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attnmask.collect.patterns import CollectResult
from attnmask.errors import AttnmaskError
from attnmask.store.stores import SitePatterns


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """The rank and world size torchrun put in the environment (a world of 1 without torchrun)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise AttnmaskError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    return World(rank, size, local)


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on CPU); returns this rank's device."""
    import torch.distributed as dist

    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return device


def stop(world: World) -> None:
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(world: World, error: AttnmaskError | None) -> None:
    """Every rank calls this; if any rank had an error, every rank raises (its own error, or a pointer)."""
    import torch.distributed as dist

    if not world.distributed:
        if error is not None:
            raise error
        return
    failed = torch.tensor([1 if error is not None else 0], dtype=torch.int64, device=_reduce_device())
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
    if error is not None:
        raise error
    if int(failed.item()) > 0:
        raise AttnmaskError(f"rank {world.rank}: stopping because another rank failed (see its error)")


def reduce_sum(world: World, array: np.ndarray) -> np.ndarray:
    """Σ over ranks of `array` (same dtype: float64 sums, int64 counts), returned on every rank."""
    import torch.distributed as dist

    if not world.distributed:
        return array
    t = torch.from_numpy(np.ascontiguousarray(array)).to(_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def reduce_result(world: World, result):
    """Add the CollectResult of every rank (sums float64, counts and totals int64)."""
    if not world.distributed:
        return result
    sites = {}
    for name in sorted(result.sites):
        s = result.sites[name]
        sites[name] = SitePatterns(reduce_sum(world, s.sum.astype(np.float64)),
                                   reduce_sum(world, s.count.astype(np.int64)), s.causal, dict(s.attrs))
    totals = reduce_sum(world, np.array([result.sequences, result.tokens, result.batches], dtype=np.int64))
    return CollectResult(sites, int(totals[0]), int(totals[1]), result.cursor, int(totals[2]))


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.distributed:
        dist.barrier()


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's `value` on every rank (a small picklable object)."""
    import torch.distributed as dist

    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
