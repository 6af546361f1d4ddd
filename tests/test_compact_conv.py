"""compact_conv2d / compact_linear ops: against an independent composite reference (two conv2d +
sqrt + div, per-group norm), gradcheck, opcheck, odd layouts, empty batch and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import robustops  # noqa: F401
from robustops.ops import compact_conv2d, compact_linear

PATHS = ["direct", "gemm"]  # the CPU kernel's two forward paths, forced through the env knob


@pytest.fixture(params=PATHS)
def cpu_path(request, monkeypatch):
    monkeypatch.setenv("ROBUSTOPS_COMPACT_CONV_IMPL", request.param)
    return request.param


def reference(x, w, b, stride=1, padding=0, dilation=1, groups=1, alpha=1.0, delta=0.01):
    """Paper Fig. 4 as a composite: conv(x, w) / (sqrt(conv(sum_c x^2, ones)) + delta), per group."""
    u = F.conv2d(x, w, None, stride, padding, dilation, groups)
    n, c, h, wd = x.shape
    q = (x * x).reshape(n, groups, c // groups, h, wd).sum(2)
    ones = torch.ones(groups, 1, w.shape[2], w.shape[3], dtype=x.dtype)
    s = F.conv2d(q, ones, None, stride, padding, dilation, groups)
    norm = (s.sqrt() + delta).repeat_interleave(w.shape[0] // groups, dim=1)
    y = alpha * u / norm
    return y if b is None else y + b.view(1, -1, 1, 1)


def make(shape_x, shape_w, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, generator=g, dtype=dtype)
    w = torch.randn(*shape_w, generator=g, dtype=dtype)
    b = torch.randn(shape_w[0], generator=g, dtype=dtype) if bias else None
    return x, w, b


# (x shape, w shape, stride, padding, dilation, groups)
CONFIGS = [
    ((2, 3, 9, 11), (5, 3, 3, 3), 1, 1, 1, 1),
    ((3, 4, 10, 7), (8, 2, 3, 3), 2, 1, 1, 2),
    ((2, 6, 12, 13), (9, 2, 2, 2), 1, 2, 2, 3),
    ((1, 2, 5, 5), (7, 2, 5, 5), 3, 0, 1, 1),
    ((2, 4, 8, 9), (6, 4, 3, 1), (2, 1), (0, 2), (1, 3), 1),
    ((2, 8, 6, 6), (8, 1, 3, 3), 1, 1, 1, 8),  # depthwise
    ((2, 40, 8, 8), (16, 40, 3, 3), 1, 1, 1, 1),  # K = 360: above the direct path's threshold
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(cfg, dtype, cpu_path):
    xs, ws, stride, padding, dilation, groups = cfg
    x, w, b = make(xs, ws, dtype)
    y = compact_conv2d(x, w, b, stride, padding, dilation, groups, 1.7, 0.01)
    r = reference(x, w, b, stride, padding, dilation, groups, 1.7, 0.01)
    assert y.shape == r.shape and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_direct_path_every_isa_and_streaming_stores(isa, monkeypatch):
    """The direct path's micro-kernel is built for baseline x86-64, AVX2 and AVX-512 (picked at run
    time, capped by ROBUSTOPS_COMPACT_CONV_ISA); outputs >= 4 MB are written with streaming stores,
    including unaligned rows and partial micro-tiles."""
    monkeypatch.setenv("ROBUSTOPS_COMPACT_CONV_IMPL", "direct")
    monkeypatch.setenv("ROBUSTOPS_COMPACT_CONV_ISA", isa)
    for dtype in (torch.float32, torch.float64):
        # CONFIGS: small planes (one task per image plane); the last two: planes above 1024 pixels
        # and a column buffer above the budget (256-pixel tiles with a remainder tile)
        for cfg in CONFIGS[:6] + [((2, 3, 37, 41), (5, 3, 3, 3), 1, 1, 1, 1), ((1, 8, 20, 20), (6, 8, 3, 3), 1, 1, 1, 1)]:
            xs, ws, stride, padding, dilation, groups = cfg
            x, w, b = make(xs, ws, dtype)
            y = compact_conv2d(x, w, b, stride, padding, dilation, groups, 1.7, 0.01)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(y, reference(x, w, b, stride, padding, dilation, groups, 1.7, 0.01),
                                       rtol=tol, atol=tol)
    # large outputs: 64B-aligned rows (28x28, float32) and rows of odd length (27x29, float64), 1 and 2 threads
    for dtype, n_img, hw, cout in ((torch.float32, 48, (28, 28), 32), (torch.float64, 32, (27, 29), 24)):
        x, w, b = make((n_img, 1, *hw), (cout, 1, 3, 3), dtype)
        ref = reference(x, w, b, 1, 1, 1, 1, 2.0, 0.01)
        assert ref.numel() * ref.element_size() >= 4 << 20
        for threads in (1, 2):
            n = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                y = compact_conv2d(x, w, b, 1, 1, 1, 1, 2.0, 0.01)
            finally:
                torch.set_num_threads(n)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def test_auto_path_and_no_bias():
    for xs, ws in [((2, 3, 10, 10), (4, 3, 3, 3)), ((2, 32, 6, 6), (4, 32, 3, 3))]:
        x, w, _ = make(xs, ws, torch.float64)
        y = compact_conv2d(x, w, None, 1, 1, 1, 1, 0.5, 0.05)
        torch.testing.assert_close(y, reference(x, w, None, 1, 1, 1, 1, 0.5, 0.05), rtol=1e-12, atol=1e-12)


def test_patch_norm_semantics():
    """Each output is W . (alpha * patch / (||patch|| + delta)) (paper eq. 6), checked by hand."""
    x, w, b = make((1, 2, 4, 5), (3, 2, 3, 3), torch.float64)
    y = compact_conv2d(x, w, b, 1, 0, 1, 1, 2.0, 0.01)
    for oh in range(2):
        for ow in range(3):
            patch = x[0, :, oh:oh + 3, ow:ow + 3]
            v = 2.0 * patch / (patch.norm() + 0.01)
            for o in range(3):
                assert math.isclose(float((w[o] * v).sum() + b[o]), float(y[0, o, oh, ow]), rel_tol=1e-12)


def test_noncontiguous_and_channels_last(cpu_path):
    x, w, b = make((2, 3, 8, 10), (4, 3, 3, 3), torch.float64)
    r = reference(x, w, b, 1, 1)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    assert not xt.is_contiguous()
    torch.testing.assert_close(compact_conv2d(xt, w, b, 1, 1), r)
    torch.testing.assert_close(compact_conv2d(x.to(memory_format=torch.channels_last), w, b, 1, 1), r)
    big = torch.zeros(2, 6, 8, 10, dtype=torch.float64)
    big[:, ::2] = x
    torch.testing.assert_close(compact_conv2d(big[:, ::2], w[:, :, :, :], b, 1, 1), r)
    wt = w.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    torch.testing.assert_close(compact_conv2d(x, wt, b, 1, 1), r)


def test_unbatched_input():
    x, w, b = make((3, 7, 7), (4, 3, 3, 3), torch.float64)
    y = compact_conv2d(x, w, b, 1, 1)
    torch.testing.assert_close(y, reference(x.unsqueeze(0), w, b, 1, 1).squeeze(0))


def test_empty_batch(cpu_path):
    x, w, b = make((0, 3, 8, 8), (4, 3, 3, 3), torch.float32)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = compact_conv2d(x, w, b, 1, 1)
    assert y.shape == (0, 4, 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_zero_patches_are_finite(cpu_path):
    """All-zero patches give y = b and a zero (not NaN) norm gradient."""
    x, w, b = make((1, 2, 8, 8), (3, 2, 3, 3), torch.float64)
    x[:, :, :5, :5] = 0
    x.requires_grad_(True)
    y = compact_conv2d(x, w, b, 1, 1, 1, 1, 1.0, 0.01)
    torch.testing.assert_close(y[0, :, 1, 1], b)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "cfg",
    [
        ((2, 3, 6, 6), (4, 3, 3, 3), 1, 1, 1, 1),
        ((2, 4, 7, 6), (6, 2, 3, 2), (2, 1), (1, 2), (1, 2), 2),
        ((1, 12, 5, 5), (4, 12, 3, 3), 1, 1, 1, 1),
    ],
)
def test_gradcheck(cfg, cpu_path):
    xs, ws, stride, padding, dilation, groups = cfg
    x, w, b = make(xs, ws, torch.float64, seed=3)
    x = (x + 0.1 * x.sign()).requires_grad_(True)  # keep every patch well away from zero
    w.requires_grad_(True)
    b.requires_grad_(True)
    a = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, a):
        return compact_conv2d(x, w, b, stride, padding, dilation, groups, a, 0.01)

    assert torch.autograd.gradcheck(f, (x, w, b, a))


def test_gradients_match_reference_autograd(cpu_path):
    """float32, larger shape: every gradient equals autograd through the composite reference."""
    x, w, b = make((4, 6, 12, 12), (10, 3, 3, 3), torch.float32, seed=5)
    gy = torch.randn(4, 10, 6, 6, generator=torch.Generator().manual_seed(9))
    args = (2, 1, 1, 2)  # stride, padding, dilation, groups
    grads = []
    for fn in (compact_conv2d, reference):
        xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, b))
        a = torch.tensor(0.7, requires_grad=True)
        (fn(xx, ww, bb, *args, a, 0.01) * gy).sum().backward()
        grads.append([xx.grad, ww.grad, bb.grad, a.grad])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=2e-4, atol=2e-4)


def test_partial_gradients_and_alpha_zero(cpu_path):
    """Only some inputs require grad; alpha = 0 still gets its exact gradient <gy, u / n>."""
    x, w, b = make((2, 3, 7, 7), (4, 3, 3, 3), torch.float64, seed=2)
    gy = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_parts = {}
    xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, b))
    a = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    (reference(xx, ww, bb, 1, 1, 1, 1, a, 0.01) * gy).sum().backward()
    ref_parts = dict(x=xx.grad, w=ww.grad, b=bb.grad, a=a.grad)
    assert ref_parts["a"].abs() > 0
    for which in ["x", "w", "b", "a"]:
        t = dict(x=x.clone(), w=w.clone(), b=b.clone(), a=torch.tensor(0.0, dtype=torch.float64))
        t[which].requires_grad_(True)
        (compact_conv2d(t["x"], t["w"], t["b"], 1, 1, 1, 1, t["a"], 0.01) * gy).sum().backward()
        torch.testing.assert_close(t[which].grad, ref_parts[which])
        for other in set(t) - {which}:
            assert t[other].grad is None


def test_backward_op_mask_returns_empty():
    x, w, b = make((1, 2, 5, 5), (3, 2, 3, 3), torch.float64)
    a = torch.tensor(1.0, dtype=torch.float64)
    y = compact_conv2d(x, w, b, 1, 1, 1, 1, a)
    gx, gw, gb, ga = torch.ops.robustops._compact_conv2d_backward(
        torch.ones_like(y), x, w, b, y, [1, 1], [1, 1], [1, 1], 1, a, 0.01, [False, True, False, False]
    )
    assert gx.shape == (0,) and gb.shape == (0,) and ga.shape == (0,) and gw.shape == w.shape


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_opcheck_compact_conv2d():
    x, w, b = make((2, 4, 6, 6), (6, 2, 3, 3), torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    a = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    _opcheck(torch.ops.robustops.compact_conv2d.default, (x, w, b, [1, 2], [1, 0], [1, 1], 2, a, 0.01))
    w2 = torch.randn(5, 4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _opcheck(torch.ops.robustops.compact_conv2d.default, (x.detach(), w2, None, [1, 1], [0, 1], [2, 1], 1,
                                                          a.detach(), 0.05))


def test_opcheck_compact_linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    _opcheck(torch.ops.robustops.compact_linear.default, (x, w, b, a, 0.01))


# ---------------------------------------------------------------------------------------------
# compact_linear
# ---------------------------------------------------------------------------------------------
def linear_reference(x, w, b, alpha, delta):
    y = alpha * (x @ w.T) / (x.norm(dim=-1, keepdim=True) + delta)
    return y if b is None else y + b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=dtype, generator=g)
    w = torch.randn(3, 7, dtype=dtype, generator=g)
    b = torch.randn(3, dtype=dtype, generator=g)
    for bias in (b, None):
        torch.testing.assert_close(compact_linear(x, w, bias, 2.5, 0.01), linear_reference(x, w, bias, 2.5, 0.01))
    assert compact_linear(x[:, :0], w, b).shape == (2, 0, 3)


def test_linear_gradcheck_and_zero_row():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b, a: compact_linear(x, w, b, a, 0.01), (x, w, b, a))
    z = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    compact_linear(z, w.detach(), None, 1.0, 0.01).sum().backward()
    # only the linear part W^T gy / delta remains; the norm's gradient is taken as 0 at x = 0
    torch.testing.assert_close(z.grad, (w.detach().sum(0) / 0.01).expand(2, 6))


# ---------------------------------------------------------------------------------------------
# bad input -> named errors
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    x, w, b = make((2, 3, 8, 8), (4, 3, 3, 3), torch.float32)
    with pytest.raises(ValueError, match="channels"):
        compact_conv2d(x[:, :2], w, b)
    with pytest.raises(ValueError, match="delta"):
        compact_conv2d(x, w, b, delta=-0.1)
    with pytest.raises(ValueError, match="delta"):
        compact_conv2d(x, w, b, delta=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        compact_conv2d(x, w, b, alpha=float("inf"))
    with pytest.raises(TypeError, match="alpha"):
        compact_conv2d(x, w, b, alpha="1")
    with pytest.raises(ValueError, match="stride"):
        compact_conv2d(x, w, b, stride=0)
    with pytest.raises(ValueError, match="bias"):
        compact_conv2d(x, w, b[:3])
    with pytest.raises(ValueError, match="groups"):
        compact_conv2d(x, w, b, groups=0)
    with pytest.raises(TypeError, match="weight"):
        compact_conv2d(x, w.numpy())
    # the C++ entry point checks too (TORCH_CHECK -> RuntimeError naming the argument)
    a = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="alpha must be finite"):
        torch.ops.robustops.compact_conv2d(x, w, b, [1, 1], [0, 0], [1, 1], 1, torch.tensor(float("nan")), 0.01)
    with pytest.raises(RuntimeError, match="delta"):
        torch.ops.robustops.compact_conv2d(x, w, b, [1, 1], [0, 0], [1, 1], 1, a, -1.0)
    with pytest.raises(RuntimeError, match="weight.size\\(1\\)"):
        torch.ops.robustops.compact_conv2d(x[:, :2], w, b, [1, 1], [0, 0], [1, 1], 1, a, 0.01)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.robustops.compact_conv2d(x.double(), w, b, [1, 1], [0, 0], [1, 1], 1, a, 0.01)
    with pytest.raises(RuntimeError, match="output size"):
        torch.ops.robustops.compact_conv2d(x[:, :, :2, :2], w, b, [1, 1], [0, 0], [1, 1], 1, a, 0.01)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.robustops.compact_conv2d(x.half(), w.half(), b.half(), [1, 1], [0, 0], [1, 1], 1, a, 0.01)
    # compact_linear
    with pytest.raises(ValueError, match="in_features"):
        compact_linear(torch.randn(2, 5), torch.randn(3, 6))
    with pytest.raises(ValueError, match="delta"):
        compact_linear(torch.randn(2, 6), torch.randn(3, 6), delta=-1)
    with pytest.raises(ValueError, match="alpha"):
        compact_linear(torch.randn(2, 6), torch.randn(3, 6), alpha=float("nan"))
    with pytest.raises(RuntimeError, match="alpha must be finite"):
        torch.ops.robustops.compact_linear(torch.randn(2, 6), torch.randn(3, 6), None, torch.tensor(float("inf")), 0.0)


# ---------------------------------------------------------------------------------------------
# absurd geometry (issue 9 item 3): overflow-checked int64 geometry, never a crash
# ---------------------------------------------------------------------------------------------
_GEOMETRY_CHILD = r"""
import json, os, sys
import torch
import torch.nn.functional as F
import robustops  # noqa: F401
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
b = torch.randn(4, dtype=torch.float64, generator=g)
a = torch.tensor(1.3, dtype=torch.float64)
for path in ("direct", "gemm"):
    os.environ["ROBUSTOPS_COMPACT_CONV_IMPL"] = path
    for s, p, d in json.loads(sys.argv[1]):
        rec = {"path": path, "geom": [s, p, d]}
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        try:
            y = torch.ops.robustops.compact_conv2d(xg, wg, b, [s, s], [p, p], [d, d], 1, a, 0.01)
            rec["shape"] = list(y.shape)
            rec["y"] = y.detach().flatten().tolist()
            gx, gw = torch.autograd.grad(y.sin().sum(), (xg, wg))
            rec["gx"], rec["gw"] = gx.flatten().tolist(), gw.flatten().tolist()
        except RuntimeError as e:
            rec["error"] = str(e).splitlines()[0]
        print(json.dumps(rec), flush=True)
print("SURVIVED", flush=True)
"""


def _run_child(code, arg):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(arg)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"child died (rc={proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert lines and lines[-1] == "SURVIVED", proc.stdout[-2000:]
    return [json.loads(line) for line in lines[:-1]]


def test_absurd_geometry_is_checked_not_a_crash():
    """stride / padding / dilation near 2**61..2**63 (issue 9: heap corruption; F.conv2d itself
    segfaults on some) give a RuntimeError naming the argument, forward and backward, both paths;
    large but accepted geometry (up to 2**31 - 1) gives exact results, checked against windows
    worked out by hand."""
    m = 2**31 - 1
    absurd = [(2**62, 2**61, 1), (1, 0, 2**62), (1, 2**62, 1), (2**63 - 1, 2**62 - 1, 1), (2**62, 2**62 - 5, 2**61)]
    large = [(m, 2**30, 2**30), (1, 2**30, 2**30), (m, 0, 1), (m, m, 1)]
    recs = _run_child(_GEOMETRY_CHILD, absurd + large)
    assert len(recs) == 2 * len(absurd + large)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    for rec in recs:
        s, p, d = rec["geom"]
        if (s, p, d) in absurd:
            assert "compact_conv2d" in rec.get("error", "") and "must be <= 2147483647" in rec["error"], rec
            continue
        assert "error" not in rec, rec
        xr = x.clone().requires_grad_(True)
        wr = w.clone().requires_grad_(True)
        if (s, p, d) == (m, 2**30, 2**30):
            # one output; taps at -2**30, 0, 2**30 in each direction: only tap (1, 1) on pixel (0, 0)
            expect = reference(xr[:, :, :1, :1], wr[:, :, 1:2, 1:2], b, 1, 0, 1, 1, 1.3, 0.01)
        elif (s, p, d) == (1, 2**30, 2**30):
            # 8x8 output; only the centre tap of each patch lands inside: a 1x1 convolution
            expect = reference(xr, wr[:, :, 1:2, 1:2], b, 1, 0, 1, 1, 1.3, 0.01)
        elif (s, p, d) == (m, 0, 1):
            expect = reference(xr[:, :, :3, :3], wr, b, 1, 0, 1, 1, 1.3, 0.01)  # one output: the first window
        else:
            # (m, m, 1): 3x3 output; rows/columns 0 and 2 are all padding (bias only), (1, 1) is the
            # first 3x3 window of the image
            centre = reference(xr[:, :, :3, :3], wr, b, 1, 0, 1, 1, 1.3, 0.01)
            expect = b.view(1, 4, 1, 1).expand(2, 4, 3, 3).clone()
            expect[:, :, 1:2, 1:2] = centre
        assert rec["shape"] == list(expect.shape), rec
        torch.testing.assert_close(torch.tensor(rec["y"], dtype=torch.float64).view(expect.shape), expect.detach())
        gx, gw = torch.autograd.grad(expect.sin().sum(), (xr, wr))
        torch.testing.assert_close(torch.tensor(rec["gx"], dtype=torch.float64).view_as(x), gx)
        torch.testing.assert_close(torch.tensor(rec["gw"], dtype=torch.float64).view_as(w), gw)


def test_python_pair_bounds():
    x, w, b = make((1, 3, 8, 8), (4, 3, 3, 3), torch.float32)
    for kw, match in [(dict(stride=2**62), "stride must be <="), (dict(padding=(1, 2**40)), "padding must be <="),
                      (dict(dilation=2**63), "dilation must be <=")]:
        with pytest.raises(ValueError, match=match):
            compact_conv2d(x, w, b, **kw)
    for bad in (1.5, (1, 2.0), "1", (1, True)):
        with pytest.raises(TypeError, match="stride"):
            compact_conv2d(x, w, b, stride=bad)
    with pytest.raises(ValueError, match="2 values"):
        compact_conv2d(x, w, b, padding=(1, 1, 1))
    import numpy as np

    torch.testing.assert_close(compact_conv2d(x, w, b, stride=np.int64(2)), compact_conv2d(x, w, b, stride=2))


# ---------------------------------------------------------------------------------------------
# compact_linear: a fresh output (issue 9 item 9), CPU dtypes, fake kernels and devices
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6), (6,)])
def test_linear_output_is_fresh_and_inplace_relu_backward(shape):
    from torch import nn

    from robustops.nn import CompactLinear

    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    y = compact_linear(x, w, None, 1.0, 0.01)
    assert y._base is None and y.is_contiguous()
    lin = CompactLinear(6, 4, dtype=torch.float64)
    seq = nn.Sequential(lin, nn.ReLU(inplace=True))
    xg = x.clone().requires_grad_(True)
    seq(xg).pow(2).sum().backward()
    # reference: the same formula written with torch ops, out-of-place ReLU
    xr = x.clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in (lin.weight, lin.bias, lin.alpha)]
    torch.relu(linear_reference(xr, params[0], params[1], params[2], lin.delta)).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    for p, r in zip((lin.weight, lin.bias, lin.alpha), params):
        torch.testing.assert_close(p.grad, r.grad)


def test_linear_cpu_refuses_half():
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(RuntimeError, match="float32 or float64"):
            compact_linear(torch.randn(2, 6, dtype=dt), torch.randn(3, 6, dtype=dt), None, 1.0, 0.01)
        with pytest.raises(RuntimeError, match="float32 or float64"):
            torch.ops.robustops._compact_linear_backward(
                torch.randn(2, 3, dtype=dt), torch.randn(2, 6, dtype=dt), torch.randn(3, 6, dtype=dt), None,
                torch.tensor(1.0), 0.01, [True, True, False, False])


def test_fake_kernels_refuse_mixed_meta_and_real_devices():
    a = torch.tensor(1.0)
    xm, wm = torch.randn(2, 3, 8, 8, device="meta"), torch.randn(4, 3, 3, 3, device="meta")
    # all meta (alpha may stay on the CPU): shape inference works
    assert torch.ops.robustops.compact_conv2d(xm, wm, None, [1, 1], [1, 1], [1, 1], 1, a, 0.01).shape == (2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="weight must be on x's device"):
        torch.ops.robustops.compact_conv2d(xm, torch.randn(4, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, a, 0.01)
    with pytest.raises(RuntimeError, match="bias must be on x's device"):
        torch.ops.robustops.compact_conv2d(xm, wm, torch.randn(4), [1, 1], [1, 1], [1, 1], 1, a, 0.01)
    with pytest.raises(RuntimeError, match="weight must be on x's device"):
        torch.ops.robustops.compact_linear(torch.randn(2, 6, device="meta"), torch.randn(3, 6), None, a, 0.01)
    with pytest.raises(RuntimeError, match="grad must be on x's device"):
        torch.ops.robustops.fgsm_step(torch.rand(2, 3, device="meta"), torch.rand(2, 3), torch.tensor([0.1]), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="delta must be on base's device"):
        torch.ops.robustops.kernel_dropout_eval(
            torch.randn(1, 2, 4, 4, device="meta"), torch.randn(1, 3, 6, 6), torch.randn(2, 3, 3, 3, device="meta"),
            torch.tensor([0]), [1, 1], [0, 0], [1, 1], None, None, False, [0, 0], [0, 0])


# ---------------------------------------------------------------------------------------------
# torch.autocast (issue 14 item 6): compiled ops run in float32 inside mixed-precision models
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_under_cpu_autocast(dtype):
    x, w, b = make((2, 3, 8, 8), (4, 3, 3, 3), torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        # half inputs (what an autocast conv hands on) with float32 weights
        y = compact_conv2d(x.to(dtype), w, b, 1, 1, 1, 1, 1.5, 0.01)
        z = compact_linear(x.flatten(1).to(dtype), torch.randn(5, 192), None, 2.0, 0.01)
    assert y.dtype == torch.float32 and z.dtype == torch.float32
    torch.testing.assert_close(y, reference(x.to(dtype).float(), w, b, 1, 1, 1, 1, 1.5, 0.01))
    with torch.autocast("cpu", dtype=dtype):  # float64 inputs are promoted to, not cast down from
        y64 = compact_conv2d(x.double(), w, b, 1, 1, 1, 1, 1.5, 0.01)
    assert y64.dtype == torch.float64


def _mixed_models():
    from torch import nn

    from robustops import nn as rnn

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 32), nn.ReLU(), nn.Linear(32, 10))
    return {
        "L2SM": rnn.build_variant("L2SM").model,
        "CCN": rnn.build_variant("CCN").model,
        "CCN+LS": rnn.build_variant("CCN+LS").model,
        "compactify(conv=False)": rnn.compactify(plain, conv=False),
        "mixed": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), rnn.CompactConv2d(4, 6, 3, padding=1),
                               nn.ReLU(), nn.Flatten(), rnn.CompactLinear(6 * 28 * 28, 16), nn.ReLU(inplace=True),
                               nn.Linear(16, 10)),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["L2SM", "CCN", "CCN+LS", "compactify(conv=False)", "mixed"])
def test_models_under_cpu_autocast_forward_and_backward(name, dtype):
    model = _mixed_models()[name].eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    ref = model(x)
    ref_loss = F.cross_entropy(ref, y)
    ref_grads = torch.autograd.grad(ref_loss, [p for p in model.parameters()])
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        loss = F.cross_entropy(out, y)
    assert loss.dtype == torch.float32
    scale = ref.abs().max().item()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (out.float() - ref).abs().max().item() <= tol * max(scale, 1.0), (out, ref)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params)  # backward outside the autocast region
    with torch.autocast("cpu", dtype=dtype):  # and inside it (the backward ops have autocast kernels too)
        grads_in = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    for g_out, g_in, g_ref, p in zip(grads, grads_in, ref_grads, params):
        assert g_out.dtype == p.dtype and torch.isfinite(g_out).all() and torch.isfinite(g_in).all()
        torch.testing.assert_close(g_out, g_in)
        # gradients flow and point the same way as in float32
        if g_ref.abs().max() > 1e-6:
            cos = F.cosine_similarity(g_out.flatten().double(), g_ref.flatten().double(), dim=0)
            assert cos > 0.95, (name, p.shape, cos)
