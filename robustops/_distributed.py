"""Sharding evaluation loops across ``torchrun`` ranks, results gathered on rank 0.

When robustops runs under ``torchrun --nproc_per_node=K`` (``WORLD_SIZE`` > 1 in the
environment), an evaluation over N points gives each rank a contiguous block of the points
(:func:`shard_indices`), and the per-point results are put back in order on every rank
(:func:`gather_cat`) or summed (:func:`all_reduce_sum`). The blocks are contiguous and the
gathered result is concatenated in rank order, so the numbers equal a single-process run over
the same points (per-point computations do not depend on the other points of the shard, as long
as the model has no batch-mixing layer in eval mode).

Without ``torchrun`` every helper is the identity: ``world() == (0, 1)``.
The process group is initialised on first use from the environment (``gloo`` on CPU, ``nccl``
when the tensors live on CUDA), unless the caller initialised it already.
"""
from __future__ import annotations

import atexit
import os
from typing import List, Tuple

import torch

__all__ = ["world", "is_main", "shard_indices", "shard_range", "gather_cat", "all_reduce_sum", "barrier"]


def _maybe_init(device: torch.device = torch.device("cpu")) -> bool:
    """True when a process group of more than one rank is (now) initialised."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if (device.type == "cuda" and dist.is_nccl_available()) else "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(_shutdown)  # a rank leaving without this can abort its peers in gloo
    return True


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def world() -> Tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` outside ``torchrun``."""
    if not _maybe_init():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return world()[0] == 0


def shard_range(n: int) -> Tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous block of ``n`` points (sizes differ by <= 1)."""
    rank, size = world()
    base, extra = divmod(int(n), size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_indices(n: int) -> torch.Tensor:
    """Indices (int64 ``[n_rank]``) of this rank's block of ``n`` points."""
    start, stop = shard_range(n)
    return torch.arange(start, stop, dtype=torch.long)


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order, on every rank.

    Shards may differ in length along dim 0; other dims must agree. Identity in one process.
    """
    if not _maybe_init(t.device):
        return t
    import torch.distributed as dist

    if t.dtype == torch.bool:  # gloo has no bool collectives
        return gather_cat(t.to(torch.uint8)).bool()
    size = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    lengths: List[int] = [int(s) for s in sizes]
    longest = max(lengths)
    pad = torch.zeros((longest - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded = torch.cat([t, pad]).contiguous()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, lengths)])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``t`` over ranks (a new tensor); identity in one process."""
    if not _maybe_init(t.device):
        return t
    import torch.distributed as dist

    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if _maybe_init():
        import torch.distributed as dist

        dist.barrier()
