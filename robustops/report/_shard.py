"""Evaluation loops of the report, sharded over ``torchrun`` ranks with the one-process numbers.

The points are cut into fixed chunks (the same chunks for any number of ranks); every chunk is
computed with its own seed (``seed + chunk index``) on exactly the same inputs, whatever rank runs
it, and the per-point results are gathered in chunk order (:func:`robustops._distributed.gather_cat`
over contiguous blocks of chunks). So a sharded run gives bit-for-bit the numbers of one process,
even for batch-size-dependent kernels and randomised attacks. Outside ``torchrun`` it is a plain loop.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, Optional

import torch

from .. import _distributed as rd

__all__ = ["map_chunks", "world", "is_main", "broadcast_module", "progress_enabled"]

_PROGRESS = {"on": None}


def world():
    return rd.world()


def is_main() -> bool:
    return rd.is_main()


def progress_enabled() -> bool:
    """tqdm bars: on when stderr is a terminal (and on rank 0), unless set by the CLI."""
    if _PROGRESS["on"] is not None:
        return bool(_PROGRESS["on"]) and is_main()
    return sys.stderr.isatty() and is_main()


def set_progress(on: Optional[bool]) -> None:
    _PROGRESS["on"] = on


def _bar(iterable, total: int, desc: str):
    if not progress_enabled():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def map_chunks(fn: Callable[[int, int, int], Dict[str, object]], n: int, chunk: int,
               desc: str = "") -> Dict[str, object]:
    """Run ``fn(chunk_index, start, stop)`` over this rank's chunks of ``range(n)`` and return, on
    every rank, each key's results over all chunks in point order.

    ``fn`` returns a dict. A tensor value has one row per point (first dimension ``stop - start``);
    the result holds those rows concatenated over all points. A key starting with ``chunk_`` holds
    one Python object per chunk (timings, counts, flags); the result holds the list over chunks.
    """
    if n <= 0:
        raise ValueError("map_chunks: no points")
    chunk = max(1, int(chunk))
    n_chunks = (n + chunk - 1) // chunk
    mine = rd.shard_indices(n_chunks).tolist()
    parts: Dict[str, list] = {}
    objs: Dict[str, list] = {}
    for ci in _bar(mine, len(mine), desc):
        start, stop = ci * chunk, min(n, (ci + 1) * chunk)
        out = fn(ci, start, stop)
        for k, v in out.items():
            if k.startswith("chunk_"):
                objs.setdefault(k, []).append(v)
                continue
            v = torch.as_tensor(v).detach().cpu()
            if v.shape[:1] != (stop - start,):
                raise RuntimeError(f"map_chunks: {k!r} has shape {tuple(v.shape)}, expected {stop - start} rows")
            parts.setdefault(k, []).append(v)
    rank, size = rd.world()
    if size == 1:
        result: Dict[str, object] = {k: torch.cat(v) for k, v in parts.items()}
        result.update(objs)
        return result
    # ranks with no chunk (more ranks than chunks) still take part in every collective: agree on
    # the keys, trailing shapes and dtypes first; per-chunk objects travel pickled, in rank order
    import torch.distributed as dist

    meta = ({k: (tuple(v[0].shape[1:]), v[0].dtype) for k, v in parts.items()}, objs)
    metas = [None] * size
    dist.all_gather_object(metas, meta)
    shapes = {}
    for m, _ in metas:
        shapes.update(m)
    result = {}
    for k in sorted(shapes):
        shape, dtype = shapes[k]
        local = torch.cat(parts[k]) if k in parts else torch.zeros((0, *shape), dtype=dtype)
        result[k] = rd.gather_cat(local)
    for _, o in metas:
        for k, v in o.items():
            result.setdefault(k, []).extend(v)
    return result


def broadcast_module(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (a model trained on rank 0 only)."""
    rank, size = rd.world()
    if size == 1:
        return
    import torch.distributed as dist

    sd = [model.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(sd, src=0)
    if rank != 0:
        model.load_state_dict(sd[0])


def barrier() -> None:
    rd.barrier()
