"""Timing helpers shared by the benchmark files (run through benchmarks/run.py)."""
from __future__ import annotations


def interleaved(fns: dict, reps: int, best: bool = False) -> dict:
    """Median seconds of each function, timed in alternation (rep by rep), after one warm-up each.

    On a shared machine the load drifts over minutes; alternating the candidates exposes them to
    the same drift, so their ratio is steadier than that of two separate timing blocks.
    """
    import time

    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    if best:
        return med, {k: min(v) for k, v in times.items()}
    return med
