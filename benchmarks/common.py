"""Timing helpers shared by the benchmark modules (torch.utils.benchmark, same process)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils import benchmark


def median_seconds(fn: Callable[[], object], min_run_time: float = 0.5) -> float:
    """Median wall time of ``fn()``, measured by ``torch.utils.benchmark.Timer.blocked_autorange``
    (which synchronises CUDA). Runs ``fn`` once first as a warm-up."""
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def compare(
    name: str,
    shape: str,
    impl: str,
    impl_fn: Callable[[], object],
    reference: str,
    reference_fn: Callable[[], object],
    min_run_time: float = 0.5,
    reference_median_s: Optional[float] = None,
) -> dict:
    """Time ``impl_fn`` against ``reference_fn`` in this process and return one JSON record.

    ``ratio`` = impl time / reference time (below 1 is faster); ``speedup`` = its inverse.
    Pass ``reference_median_s`` to reuse a reference already timed for another record.
    """
    ref = reference_median_s if reference_median_s is not None else median_seconds(reference_fn, min_run_time)
    med = median_seconds(impl_fn, min_run_time)
    return {
        "name": name,
        "shape": shape,
        "impl": impl,
        "reference": reference,
        "median_s": med,
        "reference_median_s": ref,
        "ratio": med / ref,
        "speedup": ref / med,
        "device": "cuda" if torch.cuda.is_available() and "cuda" in shape else "cpu",
        "threads": torch.get_num_threads(),
    }
