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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
