"""Benchmark of the fused compact_conv2d op against plain conv2d (the floor) and the naive composite.

    python benchmarks/bench_compact_conv.py [--quick] [--device cpu|cuda] [--json out.json]
        [--threads N] [--cpu-time]

``run(quick)`` returns a list of records ``{name, shape, impl, reference, median_s, ratio}``; the
lead's ``benchmarks/run.py`` imports this module and calls it. For every shape and for forward and
forward+backward it times:

  * ``conv2d``    F.conv2d(x, w, b, padding=1)                       (reference, ratio 1)
  * ``naive``     two conv2d + sqrt + div (the composite of the paper's Fig. 4)
  * ``fused``     robustops.ops.compact_conv2d

and reports ``ratio = median(impl) / median(conv2d)``. All timings in one process with
torch.utils.benchmark.Timer; the three implementations are timed in rounds, interleaved, and the
median over rounds is kept, so that load from other processes hits all three alike.
forward+backward: x and weight (and bias, alpha) require grad, loss = (y * g).sum() with a fixed g.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import timeit

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import robustops  # noqa: E402,F401
from robustops.ops import compact_conv2d  # noqa: E402

# (N, C, H, W, Cout), 3x3 kernels, stride 1, padding 1
SHAPES = [
    (128, 1, 28, 28, 32),
    (128, 3, 32, 32, 64),
    (128, 64, 16, 16, 128),
    (64, 128, 8, 8, 256),
    (128, 256, 8, 8, 256),
]
DELTA = 0.01


def naive_compact_conv2d(x, w, b, alpha, delta=DELTA, padding=1):
    u = F.conv2d(x, w, None, 1, padding)
    ones = torch.ones(1, 1, w.shape[2], w.shape[3], dtype=x.dtype, device=x.device)
    s = F.conv2d((x * x).sum(1, keepdim=True), ones, None, 1, padding)
    return alpha * u / (s.sqrt() + delta) + b.view(1, -1, 1, 1)


def _impls(x, w, b, alpha):
    return {
        "conv2d": lambda: F.conv2d(x, w, b, 1, 1),
        "naive": lambda: naive_compact_conv2d(x, w, b, alpha),
        "fused": lambda: compact_conv2d(x, w, b, 1, 1, 1, 1, alpha, DELTA),
    }


def _fwd_bwd(fn, g, params):
    def step():
        for p in params:
            p.grad = None
        (fn() * g).sum().backward()

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


_TIMER = timeit.default_timer  # wall clock; --cpu-time switches to process CPU time


def _time(fn, device, min_run_time):
    def call():
        fn()
        _sync(device)

    t = Timer("call()", globals={"call": call}, timer=_TIMER)
    return t.blocked_autorange(min_run_time=min_run_time).median


def bench_shape(shape, device, rounds, min_run_time, dtype=torch.float32):
    n, c, h, w_, o = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, c, h, w_, generator=gen, dtype=dtype).sub_(0.5).to(device)
    w = (torch.randn(o, c, 3, 3, generator=gen, dtype=dtype) / (3 * c) ** 0.5).to(device)
    b = torch.randn(o, generator=gen, dtype=dtype).to(device)
    alpha = torch.tensor(2.0, dtype=dtype, device=device)
    records = []
    with torch.no_grad():
        impls = _impls(x, w, b, alpha)
        for fn in impls.values():  # warm-up (oneDNN primitive creation, allocator)
            fn()
        times = {k: [] for k in impls}
        for _ in range(rounds):
            for k, fn in impls.items():
                times[k].append(_time(fn, device, min_run_time))
    records += _records("forward", shape, times, device)

    xg, wg, bg, ag = (t.clone().requires_grad_(True) for t in (x, w, b, alpha))
    gy = torch.randn(n, o, h, w_, generator=gen, dtype=dtype).to(device)
    impls = {k: _fwd_bwd(fn, gy, (xg, wg, bg, ag)) for k, fn in _impls(xg, wg, bg, ag).items()}
    for fn in impls.values():
        fn()
    times = {k: [] for k in impls}
    for _ in range(rounds):
        for k, fn in impls.items():
            times[k].append(_time(fn, device, min_run_time))
    records += _records("forward+backward", shape, times, device)
    return records


def _records(kind, shape, times, device):
    n, c, h, w_, o = shape
    ref = statistics.median(times["conv2d"])
    out = []
    for k, ts in times.items():
        med = statistics.median(ts)
        out.append(
            {
                "name": f"compact_conv2d {kind} [{device.type}]",
                "shape": f"{n}x{c}x{h}x{w_}->{o} (3x3, pad 1)",
                "impl": k,
                "reference": "conv2d",
                "median_s": med,
                "reference_median_s": ref,
                "ratio": med / ref,
                "speedup": ref / med,
            }
        )
    return out


def run(quick: bool = False, device: str | None = None) -> list:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = SHAPES[:1] + SHAPES[3:4] if quick else SHAPES
    rounds = 1 if quick else 3
    min_run_time = 0.2 if quick else 0.5
    records = []
    for shape in shapes:
        records += bench_shape(shape, dev, rounds, min_run_time)
    return records


def _print_table(records):
    rows = {}
    for r in records:
        rows.setdefault((r["name"], r["shape"]), {})[r["impl"]] = r
    print(f"{'what':38s} {'shape':30s} {'conv2d ms':>10s} {'naive':>7s} {'fused':>7s}")
    for (name, shape), d in rows.items():
        print(
            f"{name:38s} {shape:30s} {d['conv2d']['median_s'] * 1e3:10.2f} "
            f"{d['naive']['ratio']:6.2f}x {d['fused']['ratio']:6.2f}x"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="write the records to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time instead of wall clock (stable on a shared machine; "
                         "meaningful with --threads 1 on CPU only)")
    args = ap.parse_args(argv)
    global _TIMER
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        _TIMER = time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'process CPU time' if args.cpu_time else 'wall clock'}")
    records = run(args.quick, args.device)
    _print_table(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
