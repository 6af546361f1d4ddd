"""Benchmark runner: times every compiled op against its eager-PyTorch reference, same process.

    python benchmarks/run.py [--quick] [--json out.json] [--only NAME ...]

Each ``benchmarks/bench_<name>.py`` module exposes ``run(quick: bool) -> list[dict]`` returning
records {name, shape, impl, reference, median_s, reference_median_s, ratio, speedup}.
``ratio`` is impl time / reference time: below 1 means faster than the reference.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

BEST_MARK = "BEST_SECONDS"


# ---------------------------------------------------------------------------------------------
# "Best reference time" helpers. A reference such as F.conv2d (oneDNN) does not run at one speed:
# oneDNN picks its algorithm per process and per call history (one 128x1x28x28 -> 32 convolution
# was seen at 0.72 ms on first use and 9 ms after another shape ran, in the same process). A
# ratio against a slow draw flatters the op being benchmarked, so benchmarks compare against the
# BEST reference time seen: the minimum over rounds in this process (after other shapes ran) and
# over fresh processes (first use; also with a warm allocator, see WARM_ALLOCATOR_ENV), and say so
# in their output.
# ---------------------------------------------------------------------------------------------
def best_seconds(fn, rounds: int = 3, min_run_time: float = 0.2) -> float:
    """Minimum over ``rounds`` of the median time of ``fn()`` (torch.utils.benchmark, after one
    warm-up call)."""
    from torch.utils import benchmark
    import torch

    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return min(timer.blocked_autorange(min_run_time=min_run_time).median for _ in range(rounds))


def report_best(seconds: float) -> None:
    """What a fresh-process timing child prints as its last line (read by best_in_fresh_processes)."""
    print(f"{BEST_MARK} {seconds!r}", flush=True)


# glibc malloc settings that keep large freed blocks in the heap instead of returning them to the
# OS: without them every call of a reference that allocates ~10-30 MB (oneDNN's F.conv2d output
# plus its reordered copy) can page-fault all of it back in (6,241 minor faults per call measured
# for 128x1x28x28 -> 32: ~30 ms instead of ~0.9 ms under load). That is the "same convolution,
# different speed" effect; a fresh process with these settings shows the reference's best case.
WARM_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def best_in_fresh_processes(argv, runs: int = 3, timeout: float = 600.0, env: dict = None) -> float:
    """Run ``python argv...`` ``runs`` times, each a fresh process that times something once and
    ends with :func:`report_best`; return the minimum reported time. ``env``: extra environment
    variables for the children (e.g. :data:`WARM_ALLOCATOR_ENV`)."""
    import subprocess

    best = float("inf")
    for _ in range(runs):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                              cwd=os.path.dirname(HERE), env=dict(os.environ, **(env or {})))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(BEST_MARK)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"timing child {argv} failed (rc={proc.returncode}): {proc.stderr[-1000:]}")
        best = min(best, float(lines[-1].split()[1]))
    return best


def discover():
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([HERE]) if m.name.startswith("bench_"))


def main(argv=None) -> int:
    available = discover()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing (smoke run)")
    p.add_argument("--json", metavar="PATH", help="also write the records as a JSON list")
    p.add_argument("--only", nargs="+", choices=available, help="run only these benchmark modules")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before timing")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import robustops

    print(f"robustops {robustops.__version__}  build {robustops.build_info()}  threads={torch.get_num_threads()}")
    try:
        print(f"load average (1, 5, 15 min): {os.getloadavg()}  cpus: {os.cpu_count()}")
    except OSError:
        pass
    records = []
    for name in args.only or available:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        t0 = time.perf_counter()
        got = module.run(quick=args.quick)
        records.extend(got)
        print(f"\n== {name} ({time.perf_counter() - t0:.1f} s)")
        print(f"{'name':<36} {'shape':<34} {'impl':<32} {'median ms':>10} {'ref ms':>10} {'ratio':>7} {'speedup':>8}  reference")
        for r in got:
            print(f"{r['name']:<36} {r['shape']:<34} {r['impl']:<32} {r['median_s'] * 1e3:>10.3f} {r['reference_median_s'] * 1e3:>10.3f}"
                  f" {r['ratio']:>7.3f} {r['speedup']:>7.2f}x  {r['reference']}")
        notes = sorted({r["reference_note"] for r in got if r.get("reference_note")})
        for note in notes:
            print(f"  note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
