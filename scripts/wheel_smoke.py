"""Smoke test of an installed robustops (run by scripts/check_wheel.sh in a fresh venv).

Checks, against the installed distribution (run it from outside the source tree):
  * one version everywhere: the distribution metadata, ``robustops.__version__`` and
    ``build_info()["version"]``, with the local label of the build's flavour (+cpu / +cuXYZ);
  * the wheel's torch pin (Requires-Dist) admits the running torch, and the build's recorded torch
    (robustops/_build_meta.py, read before _C loads) agrees with what _C reports;
  * every operator registered in the ``robustops`` namespace (discovered from the dispatcher, so
    ops added later are included) runs once, on CPU and, with a CUDA build and a GPU, on CUDA; the
    result is compared with a plain-torch reference. An op with no entry in ``SMOKE`` below fails
    the check: add one (a call plus a reference) when adding an op.

Usage: python wheel_smoke.py [--expect-label LABEL]
Exit status 0 when everything passes; prints one line per check.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class _RecordOps(TorchDispatchMode):
    """Records every robustops::* operator that reaches the dispatcher (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "robustops":
            self.seen.add(func.name().split(".")[0])  # "robustops::fgsm_step"
        return func(*args, **(kwargs or {}))


def _close(a, b, what):
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item():.3g} vs the reference")


def smoke_fgsm_step(ops, dev):
    x, g = torch.rand(2, 3, 5, device=dev), torch.randn(2, 3, 5, device=dev)
    out = ops.fgsm_step(x, g, [0.0, 0.1, 0.3])
    ref = torch.stack([torch.clamp(x + e * g.sign(), 0, 1) for e in (0.0, 0.1, 0.3)])
    _close(out, ref, "fgsm_step")


def _compact_conv_ref(x, w, b, alpha, delta, padding):
    k = w.shape[-1]
    sq = F.conv2d(x.pow(2).sum(1, keepdim=True), torch.ones(1, 1, k, k, device=x.device, dtype=x.dtype),
                  padding=padding)
    return alpha * F.conv2d(x, w, padding=padding) / (sq.sqrt() + delta) + b.view(1, -1, 1, 1)


def smoke_compact_conv2d(ops, dev):
    x = torch.randn(2, 3, 7, 7, device=dev, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=dev, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, device=dev, dtype=torch.float64, requires_grad=True)
    out = ops.compact_conv2d(x, w, b, padding=1, alpha=2.0, delta=0.01)
    ref = _compact_conv_ref(x, w, b, 2.0, 0.01, 1)
    _close(out, ref, "compact_conv2d")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), g)  # runs _compact_conv2d_backward
    want = torch.autograd.grad(ref, (x, w, b), g)
    for name, a, r in zip(("x", "weight", "bias"), got, want):
        _close(a, r, f"compact_conv2d backward (grad {name})")


def smoke_compact_linear(ops, dev):
    x = torch.randn(5, 6, device=dev, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, device=dev, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device=dev, dtype=torch.float64, requires_grad=True)
    out = ops.compact_linear(x, w, b, alpha=1.5, delta=0.01)
    ref = 1.5 * (x @ w.T) / (x.norm(dim=-1, keepdim=True) + 0.01) + b
    _close(out, ref, "compact_linear")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), g)  # runs _compact_linear_backward
    want = torch.autograd.grad(ref, (x, w, b), g)
    for name, a, r in zip(("x", "weight", "bias"), got, want):
        _close(a, r, f"compact_linear backward (grad {name})")


def smoke_kernel_dropout_eval(ops, dev):
    x = torch.randn(2, 3, 8, 8, device=dev, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, device=dev, dtype=torch.float64)
    base = F.conv2d(x, w, padding=1)
    channels = torch.tensor([0, 2], device=dev)
    out = ops.kernel_dropout_eval(base, x, w, channels, padding=1, relu=True, pool_kernel=2)
    ref = torch.stack([
        F.max_pool2d(F.relu(base - F.conv2d(x[:, c:c + 1], w[:, c:c + 1], padding=1)), 2) for c in (0, 2)
    ])
    _close(out, ref, "kernel_dropout_eval")


def smoke_apgd_step(ops, dev):
    x0 = torch.rand(3, 2, 4, 4, device=dev, dtype=torch.float64)
    x = (x0 + 0.05 * torch.randn_like(x0)).clamp(0, 1)
    x_prev, g = x0.clone(), torch.randn_like(x0)
    out = ops.apgd_step(x, x_prev, x0, g, 0.2, 0.1, 0.75, 0.0, 1.0, "Linf")

    def proj(v):  # Linf ball of radius 0.1 around x0, then the box
        return torch.clamp(torch.min(torch.max(v, x0 - 0.1), x0 + 0.1), 0, 1)

    z = proj(x + 0.2 * g.sign())
    ref = proj(x + 0.75 * (z - x) + 0.25 * (x - x_prev))
    _close(out, ref, "apgd_step")


def smoke_fab_projection(ops, dev):
    t = torch.full((2, 6), 0.5, device=dev, dtype=torch.float64)
    w = torch.tensor([[1.0, 1, 1, 1, 1, 1], [2.0, 0, 0, 0, 0, 0]], device=dev, dtype=torch.float64)
    b = torch.tensor([3.6, 1.2], device=dev, dtype=torch.float64)
    d = ops.fab_projection(t, w, b, 0.0, 1.0, "Linf")
    # minimal Linf steps onto <w, t + d> = b: every coordinate +0.1 (row 0); one coordinate +0.1 (row 1)
    ref = torch.zeros_like(t)
    ref[0] = 0.1
    ref[1, 0] = 0.1
    _close(d, ref, "fab_projection")


def smoke_forest_leaf_masks(ops, dev):
    # one group, two trees on one input (column 0 of x): tree 0 cuts at 0.5, tree 1 at 0.7, so
    # group bins 0, 1, 2 (among the cuts 0.5, 0.7) -> tree bins (0, 0), (1, 0), (1, 1)
    i64 = dict(device=dev, dtype=torch.int64)
    x = torch.tensor([[0.2], [0.9]], device=dev)
    groups, columns, input_start = torch.tensor([0, 0], **i64), torch.tensor([0], **i64), torch.tensor([0, 1], **i64)
    cuts, cut_start = torch.tensor([0.5, 0.7], device=dev), torch.tensor([0, 2], **i64)
    bin_map = torch.tensor([0, 0, 1, 0, 1, 1], device=dev, dtype=torch.uint8)
    mask_start = torch.tensor([0, 2, 4], **i64)
    masks = torch.tensor([[1], [2], [1], [2]], **i64)                     # per tree: bin b -> leaf b
    leaf_start = torch.tensor([0, 2, 4], **i64)
    value = torch.tensor([[0.0], [1.0], [0.25], [0.75]], device=dev, dtype=torch.float64)
    out = ops.forest_leaf_masks(x, groups, columns, input_start, cuts, cut_start, bin_map, mask_start, masks,
                                leaf_start, value)
    ref = torch.tensor([[(0.0 + 0.25) / 2], [(1.0 + 0.75) / 2]], device=dev, dtype=torch.float64)
    _close(out, ref, "forest_leaf_masks")


#: op -> smoke function (device) running it once against a reference. Add one with every new op.
SMOKE = {
    "robustops::fgsm_step": smoke_fgsm_step,
    "robustops::compact_conv2d": smoke_compact_conv2d,  # + robustops::_compact_conv2d_backward
    "robustops::compact_linear": smoke_compact_linear,  # + robustops::_compact_linear_backward
    "robustops::kernel_dropout_eval": smoke_kernel_dropout_eval,
    "robustops::apgd_step": smoke_apgd_step,
    "robustops::fab_projection": smoke_fab_projection,
    "robustops::forest_leaf_masks": smoke_forest_leaf_masks,
}


def _check_versions(robustops, expect_label):
    dist_version = metadata.version("robustops")
    info = robustops.build_info()
    print(f"version: metadata {dist_version}, __version__ {robustops.__version__}, build_info {info.get('version')}")
    if not (dist_version == robustops.__version__ == info.get("version")):
        raise AssertionError("the three versions differ")
    label = dist_version.partition("+")[2]
    if expect_label is None:
        from robustops._version import local_label

        expect_label = local_label(info.get("cuda_version"))
    if label != expect_label:
        raise AssertionError(f"local version label {label!r}, expected {expect_label!r} for this build")
    from robustops import _build_meta

    if (_build_meta.torch_version, _build_meta.torch_cuda_version) != (info["torch_version"], info["cuda_version"]):
        raise AssertionError(f"_build_meta ({_build_meta.torch_version}, {_build_meta.torch_cuda_version}) "
                             f"disagrees with _C ({info['torch_version']}, {info['cuda_version']})")
    pins = [r for r in (metadata.requires("robustops") or []) if re.match(r"torch\b", r)]
    print(f"torch: running {torch.__version__}, built against {info['torch_version']}, wheel requires {pins}")
    m = re.fullmatch(r"torch\s*==\s*(\d+)\.(\d+)\.\*", pins[0]) if len(pins) == 1 else None
    if m is None or torch.__version__.split(".")[:2] != [m.group(1), m.group(2)]:
        raise AssertionError(f"the wheel's torch requirement {pins} should pin this torch series")


def run_ops(robustops, smoke=None):
    """Run every SMOKE entry whose op is registered; return (registered ops, ops that never ran)."""
    smoke = SMOKE if smoke is None else smoke
    registered = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("robustops::"))
    devices = ["cpu"]
    if robustops.build_info()["cuda"] and torch.cuda.is_available():
        devices.append("cuda")
    recorder = _RecordOps()
    with recorder:
        for name in registered:
            if name in smoke:
                for dev in devices:
                    smoke[name](robustops.ops, dev)
                print(f"ran {name} on {', '.join(devices)}: matches the reference")
    return registered, [n for n in registered if n not in recorder.seen]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect-label", default=os.environ.get("ROBUSTOPS_LOCAL_VERSION"),
                        help="expected local version label (default: the build's flavour)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    import robustops

    print(f"robustops imported from {robustops.__file__}")
    print(f"build_info: {robustops.build_info()}")
    _check_versions(robustops, args.expect_label)

    registered, missing = run_ops(robustops)
    if missing:
        raise SystemExit(
            f"FAIL: {len(missing)} registered op(s) never ran: {missing}. Add a smoke call with a "
            f"reference for each to SMOKE in {os.path.abspath(__file__)}."
        )
    print(f"all {len(registered)} registered robustops ops ran: {registered}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
