"""Benchmark of the fused compact_conv2d op against plain conv2d (the floor) and the naive composite.

    python benchmarks/bench_compact_conv.py [--quick] [--device cpu|cuda] [--json out.json]
        [--threads N] [--cpu-time]

``run(quick)`` returns a list of records ``{name, shape, impl, reference, median_s, ratio}``; the
lead's ``benchmarks/run.py`` imports this module and calls it. For every shape and for forward and
forward+backward it times:

  * ``conv2d``    F.conv2d(x, w, b, padding=1)                       (reference, ratio 1)
  * ``naive``     two conv2d + sqrt + div (the composite of the paper's Fig. 4)
  * ``fused``     robustops.ops.compact_conv2d

and reports ``ratio = time(impl) / best time(conv2d)``.

Honest reference: oneDNN's F.conv2d does not run at one speed (it picks its algorithm per process
and call history: 0.72 ms vs 9 ms seen for the same 128x1x28x28 -> 32 convolution), so the
reference is the BEST F.conv2d time seen: the minimum over the in-process rounds (timed after the
other shapes) and over ``--fresh`` fresh processes that time F.conv2d on first use, with the default
glibc allocator and with one that keeps freed blocks (``benchmarks.run.WARM_ALLOCATOR_ENV``: the
slow draws are F.conv2d page-faulting its ~25 MB of output and reorder buffers back in on every
call, 6,241 minor faults per call on 128x1x28x28 -> 32). Every time is
the minimum over rounds of a torch.utils.benchmark median; the implementations are timed in
interleaved rounds so that load from other processes hits all alike. Records carry both the
in-process and the fresh-process conv2d times and a ``reference_note``.
forward+backward: x and weight (and bias, alpha) require grad, loss = (y * g).sum() with a fixed g.
"""
from __future__ import annotations

import argparse
import json
import os
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

    # Timer runs with ONE thread unless told otherwise: pass the process's count, or --threads is ignored
    t = Timer("call()", globals={"call": call}, timer=_TIMER, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median


def _tensors(shape, device, dtype=torch.float32):
    n, c, h, w_, o = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, c, h, w_, generator=gen, dtype=dtype).sub_(0.5).to(device)
    w = (torch.randn(o, c, 3, 3, generator=gen, dtype=dtype) / (3 * c) ** 0.5).to(device)
    b = torch.randn(o, generator=gen, dtype=dtype).to(device)
    alpha = torch.tensor(2.0, dtype=dtype, device=device)
    gy = torch.randn(n, o, h, w_, generator=gen, dtype=dtype).to(device)
    return x, w, b, alpha, gy


def _fwd_bwd_impls(x, w, b, alpha, gy):
    xg, wg, bg, ag = (t.clone().requires_grad_(True) for t in (x, w, b, alpha))
    return {k: _fwd_bwd(fn, gy, (xg, wg, bg, ag)) for k, fn in _impls(xg, wg, bg, ag).items()}


def _timed_rounds(impls, device, rounds, min_run_time):
    for fn in impls.values():  # warm-up (oneDNN primitive creation, allocator)
        fn()
    times = {k: [] for k in impls}
    for _ in range(rounds):
        for k, fn in impls.items():
            times[k].append(_time(fn, device, min_run_time))
    return {k: min(ts) for k, ts in times.items()}


def bench_shape(shape, device, rounds, min_run_time, fresh=0):
    x, w, b, alpha, gy = _tensors(shape, device)
    records = []
    with torch.no_grad():
        best = _timed_rounds(_impls(x, w, b, alpha), device, rounds, min_run_time)
    records += _records("forward", shape, best, device, _fresh_conv2d(shape, device, "forward", fresh, min_run_time))
    best = _timed_rounds(_fwd_bwd_impls(x, w, b, alpha, gy), device, rounds, min_run_time)
    records += _records("forward+backward", shape, best, device,
                        _fresh_conv2d(shape, device, "forward+backward", fresh, min_run_time))
    return records


def _fresh_conv2d(shape, device, kind, fresh, min_run_time):
    """Best F.conv2d time over ``fresh`` new processes (first use of the shape there), or None."""
    if fresh <= 0:
        return None
    from benchmarks.run import WARM_ALLOCATOR_ENV, best_in_fresh_processes

    argv = [os.path.abspath(__file__), "--ref-only", ",".join(map(str, shape)), "--kind", kind,
            "--device", device.type, "--threads", str(torch.get_num_threads()), "--min-run-time", str(min_run_time)]
    return min(best_in_fresh_processes(argv, runs=fresh),
               best_in_fresh_processes(argv, runs=fresh, env=WARM_ALLOCATOR_ENV))


def _ref_only(shape, device, kind, min_run_time):
    """Child of _fresh_conv2d: time F.conv2d first thing in this process and report it."""
    from benchmarks.run import report_best

    x, w, b, alpha, gy = _tensors(shape, device)
    if kind == "forward":
        with torch.no_grad():
            t = _timed_rounds({"conv2d": _impls(x, w, b, alpha)["conv2d"]}, device, 3, min_run_time)["conv2d"]
    else:
        t = _timed_rounds({"conv2d": _fwd_bwd_impls(x, w, b, alpha, gy)["conv2d"]}, device, 3, min_run_time)["conv2d"]
    report_best(t)


def _records(kind, shape, times, device, fresh_ref=None):
    n, c, h, w_, o = shape
    in_process = times["conv2d"]
    ref = in_process if fresh_ref is None else min(in_process, fresh_ref)
    note = ("reference = BEST F.conv2d time seen: min over in-process rounds"
            + (" and fresh processes (first use; default and warm allocator)" if fresh_ref is not None else "")
            + "; impl times = min over rounds of medians")
    out = []
    for k, med in times.items():
        out.append(
            {
                "name": f"compact_conv2d {kind} [{device.type}]",
                "shape": f"{n}x{c}x{h}x{w_}->{o} (3x3, pad 1)",
                "impl": k,
                "reference": "conv2d (best seen)",
                "median_s": med,
                "reference_median_s": ref,
                "reference_in_process_s": in_process,
                "reference_fresh_process_s": fresh_ref,
                "reference_note": note,
                "ratio": med / ref,
                "speedup": ref / med,
                "threads": torch.get_num_threads(),
            }
        )
    return out


def run(quick: bool = False, device: str | None = None, fresh: int | None = None) -> list:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = SHAPES[:1] + SHAPES[3:4] if quick else SHAPES
    rounds = 2 if quick else 3
    min_run_time = 0.2 if quick else 0.5
    fresh = (1 if quick else 3) if fresh is None else fresh
    records = []
    for shape in shapes:
        records += bench_shape(shape, dev, rounds, min_run_time, fresh)
    return records


def _print_table(records):
    rows = {}
    for r in records:
        rows.setdefault((r["name"], r["shape"]), {})[r["impl"]] = r
    print(f"{'what':38s} {'shape':30s} {'best conv2d ms':>14s} {'(in-proc)':>9s} {'(fresh)':>8s} "
          f"{'naive':>7s} {'fused':>7s} {'fused ms':>9s}")
    for (name, shape), d in rows.items():
        c = d["conv2d"]
        fresh = c["reference_fresh_process_s"]
        print(
            f"{name:38s} {shape:30s} {c['reference_median_s'] * 1e3:14.3f} {c['reference_in_process_s'] * 1e3:9.3f} "
            f"{(fresh * 1e3 if fresh is not None else float('nan')):8.3f} "
            f"{d['naive']['ratio']:6.2f}x {d['fused']['ratio']:6.2f}x {d['fused']['median_s'] * 1e3:9.3f}"
        )
    print("ratios are time / BEST F.conv2d time seen (min over in-process rounds and fresh processes)")


def paired_single_calls(shape=SHAPES[0], calls: int = 30, rounds: int = 3):
    """Forward of F.conv2d and of the fused op, min over single calls, alternating in rounds, with the
    minor page faults per call (getrusage): shows whether a slow F.conv2d is page-faulting. Run it
    with and without ``benchmarks.run.WARM_ALLOCATOR_ENV`` in the environment."""
    import resource

    x, w, b, alpha, _ = _tensors(shape, torch.device("cpu"))
    fns = {"conv2d": lambda: F.conv2d(x, w, b, 1, 1), "fused": lambda: compact_conv2d(x, w, b, 1, 1, 1, 1, alpha, DELTA)}
    best = {k: float("inf") for k in fns}
    faults = {k: 0.0 for k in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for k, fn in fns.items():
                fn()
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    best[k] = min(best[k], time.perf_counter() - t0)
                faults[k] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / calls
    n, c, h, w_, o = shape
    print(f"{n}x{c}x{h}x{w_}->{o}, {torch.get_num_threads()} threads, min over {rounds}x{calls} single calls, "
          f"load average {os.getloadavg()}, MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}")
    for k in fns:
        print(f"  {k:7s} {best[k] * 1e3:8.3f} ms   {faults[k]:7.0f} minor faults/call (last round)")
    print(f"  fused / conv2d = {best['fused'] / best['conv2d']:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="write the records to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--fresh", type=int, default=None,
                    help="fresh processes timing F.conv2d on first use (default 3, 1 with --quick)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time instead of wall clock (stable on a shared machine; "
                         "meaningful with --threads 1 on CPU only)")
    ap.add_argument("--pair", action="store_true",
                    help="paired single-call forward timing of F.conv2d and the fused op on the first shape, "
                         "with page faults per call")
    ap.add_argument("--ref-only", default=None, help=argparse.SUPPRESS)  # N,C,H,W,O: fresh-process child
    ap.add_argument("--kind", default="forward", help=argparse.SUPPRESS)
    ap.add_argument("--min-run-time", type=float, default=0.5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global _TIMER
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        _TIMER = time.process_time
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.pair:
        paired_single_calls()
        return
    if args.ref_only:
        _ref_only(tuple(int(v) for v in args.ref_only.split(",")), dev, args.kind, args.min_run_time)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'process CPU time' if args.cpu_time else 'wall clock'}, load average {os.getloadavg()}")
    records = run(args.quick, args.device, args.fresh)
    _print_table(records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
