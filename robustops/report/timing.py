"""Timing of the compiled ops against their eager references, in the running process.

Used by the report's "Speed" section (and ``robustops bench``): every record times the compiled
path and the eager PyTorch it replaces on the same inputs, interleaved round by round so that load
from other processes hits both alike, and reports the median of each and their ratio. The
``benchmarks/`` folder holds the full benchmark suite; this module is the small, installed subset
that runs inside a report on the report's own model and data.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["interleaved_median", "speed_records", "machine_load"]


def interleaved_median(fns: Dict[str, Callable[[], object]], rounds: int, min_time: float) -> Dict[str, float]:
    """Median seconds per call of each function. One warm-up call each; then ``rounds`` rounds in
    which every function runs repeatedly for at least ``min_time`` seconds (the per-call time of the
    round is kept)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for fn in fns.values():
        fn()
    per_round: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync()
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                sync()
                el = time.perf_counter() - t0
                if el >= min_time:
                    break
            per_round[k].append(el / n)
    return {k: statistics.median(v) for k, v in per_round.items()}


def machine_load() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _record(op: str, shape: str, impl: str, reference: str, t: Dict[str, float]) -> dict:
    return {"op": op, "shape": shape, "impl": impl, "reference": reference,
            "median_s": t["impl"], "reference_median_s": t["ref"], "ratio": t["impl"] / t["ref"],
            "speedup": t["ref"] / t["impl"]}


def _fgsm_step(x: torch.Tensor, rounds: int, min_time: float) -> dict:
    from robustops import ops

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(x.shape, generator=gen).to(x.device)  # noqa: same values on every device
    K = 10
    eps_list = [0.3 * (k + 1) / K for k in range(K)]

    def fused():
        return ops.fgsm_step(x, g, eps_list, 0.0, 1.0)

    def eager():
        return torch.stack([torch.clamp(x + e * g.sign(), 0.0, 1.0) for e in eps_list])

    assert torch.equal(fused(), eager())
    t = interleaved_median({"impl": fused, "ref": eager}, rounds, min_time)
    return _record("fgsm_step", f"{'x'.join(map(str, x.shape))}, K={K}", "robustops.ops.fgsm_step",
                   "eager stack of clamp(x + eps*sign(g))", t)


def _curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int, min_time: float) -> dict:
    from robustops.attacks import robust_accuracy_curve

    K = 10
    eps = [0.3 * k / (K - 1) for k in range(K)]

    def curve():
        return robust_accuracy_curve(model, (x, y), eps, batch_size=x.shape[0])

    def loop():  # per eps: forward+backward for the input gradient, the step, a forward
        out = []
        for e in eps:
            xg = x.clone().requires_grad_(True)
            loss = F.cross_entropy(model(xg), y, reduction="sum")
            g, = torch.autograd.grad(loss, xg)
            xa = torch.clamp(x + e * g.sign(), 0, 1)
            with torch.no_grad():
                out.append((model(xa).argmax(1) == y).double().mean())
        return torch.stack(out)

    model.eval()
    got, ref = curve(), loop()
    if not torch.allclose(got, ref, atol=1.0 / x.shape[0] + 1e-9):
        raise AssertionError(f"robust_accuracy_curve {got.tolist()} differs from the loop {ref.tolist()}")
    t = interleaved_median({"impl": curve, "ref": loop}, rounds, min_time)
    return _record("robust_accuracy_curve", f"{x.shape[0]} images, K={K}", "robust_accuracy_curve (1 gradient)",
                   "per-eps loop (fwd+bwd, step, fwd)", t)


def _compact_conv(x: torch.Tensor, conv: Optional[nn.Module], rounds: int, min_time: float) -> dict:
    from robustops import ops

    gen = torch.Generator().manual_seed(0)
    if conv is not None and getattr(conv, "groups", 1) == 1:
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], device=w.device)
        pad = conv.padding[0] if isinstance(conv.padding, tuple) else 0
        alpha = float(getattr(conv, "alpha", torch.tensor(1.0)).detach().reshape(-1)[0])
        delta = float(getattr(conv, "delta", 0.01))
    else:
        w = (torch.randn(32, x.shape[1], 3, 3, generator=gen) / 3.0).to(x.device)
        b = torch.zeros(32, device=x.device)
        pad, alpha, delta = 1, 1.0, 0.01
    k = w.shape[-1]
    a_t = torch.tensor(alpha, device=x.device)

    def fused():
        return ops.compact_conv2d(x, w, b, 1, pad, 1, 1, a_t, delta)

    def naive():
        u = F.conv2d(x, w, None, 1, pad)
        ones = torch.ones(1, 1, k, k, dtype=x.dtype, device=x.device)
        s = F.conv2d((x * x).sum(1, keepdim=True), ones, None, 1, pad)
        return alpha * u / (s.sqrt() + delta) + b.view(1, -1, 1, 1)

    with torch.no_grad():
        if not torch.allclose(fused(), naive(), rtol=1e-4, atol=1e-5):
            raise AssertionError("compact_conv2d differs from its eager composite")
        t = interleaved_median({"impl": fused, "ref": naive}, rounds, min_time)
    return _record("compact_conv2d", f"{'x'.join(map(str, x.shape))} -> {w.shape[0]} ({k}x{k})",
                   "robustops.ops.compact_conv2d (fused)", "eager conv2d + patch-norm conv2d + sqrt/div", t)


def _kernel_dropout(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int, min_time: float) -> dict:
    from robustops.fragile import kernel_dropout, kernel_dropout_naive
    from robustops.fragile._common import resolve_layer

    name, conv = resolve_layer(model, None)
    res = kernel_dropout(model, name, (x, y))
    ref_acc, _, _ = kernel_dropout_naive(model, name, (x, y), batch_size=256)
    if not torch.allclose(res.clean_accuracy.double(), torch.as_tensor(ref_acc).double(), atol=1e-9):
        raise AssertionError("kernel_dropout differs from the naive loop")
    t = interleaved_median({"impl": lambda: kernel_dropout(model, name, (x, y)),
                            "ref": lambda: kernel_dropout_naive(model, name, (x, y), batch_size=256)},
                           rounds, min_time)
    return _record("kernel_dropout", f"{name}: {conv.out_channels} kernels, {x.shape[0]} images",
                   f"kernel_dropout ({res.method})", "naive loop (copy model, zero kernel, evaluate)", t)


def speed_records(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, compact_model: Optional[nn.Module] = None,
                  quick: bool = False) -> List[dict]:
    """Time the compiled paths of this run against their eager references (see the module doc).

    ``x``/``y``: the run's evaluation images (repeated to a 256-image batch). Every record is also
    checked for equal results before it is timed (an AssertionError otherwise).
    """
    rounds, min_time = (2, 0.03) if quick else (5, 0.15)
    n = 64 if quick else 256
    reps = (n + x.shape[0] - 1) // x.shape[0]
    xb = x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()
    yb = y.repeat(reps)[:n].contiguous()
    conv = None
    if compact_model is not None:
        from robustops.nn import CompactConv2d

        conv = next((m for m in compact_model.modules() if isinstance(m, CompactConv2d)), None)
    # fgsm_step on a batch of >= 256k values (small images: more of them), the others on 256 images
    nf = max(n, (1 << (16 if quick else 18)) // max(1, x[0].numel()))
    xf = x.repeat((nf + x.shape[0] - 1) // x.shape[0], *([1] * (x.dim() - 1)))[:nf].contiguous()
    records = []
    for fn in (lambda: _fgsm_step(xf, rounds, min_time),
               lambda: _curve(model, xb, yb, rounds, min_time),
               lambda: _compact_conv(xb, conv, rounds, min_time),
               lambda: _kernel_dropout(model, xb, yb, rounds, min_time)):
        records.append(fn())
    for r in records:
        r["threads"] = torch.get_num_threads()
    return records
