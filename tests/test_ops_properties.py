"""Property-based tests (hypothesis) of the four compiled ops against pure-PyTorch references:
random shapes, strides, dtypes, layouts (non-contiguous, channels_last), empty dimensions,
forward and (for the differentiable ops) backward.

Profiles (tests/conftest.py): the default "ci" profile runs a few dozen examples per test;
`pytest tests/test_ops_properties.py --hypothesis-profile=deep` fuzzes for a long local run.
"""
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import robustops  # noqa: E402,F401
from robustops.ops import compact_conv2d, compact_linear, fgsm_step, kernel_dropout_eval  # noqa: E402

DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUTS = st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"])


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout (never a copy-equal contiguous tensor,
    except for layouts a shape cannot express)."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and t.dim() >= 1:
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        big[..., 1::2] = t
        return big[..., 1::2]
    return t.contiguous()


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


class _Impl:
    """Force one of compact_conv2d's CPU forward paths (direct / gemm / automatic)."""

    def __init__(self, impl):
        self.impl = impl

    def __enter__(self):
        self.old = os.environ.get("ROBUSTOPS_COMPACT_CONV_IMPL")
        if self.impl == "auto":
            os.environ.pop("ROBUSTOPS_COMPACT_CONV_IMPL", None)
        else:
            os.environ["ROBUSTOPS_COMPACT_CONV_IMPL"] = self.impl

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("ROBUSTOPS_COMPACT_CONV_IMPL", None)
        else:
            os.environ["ROBUSTOPS_COMPACT_CONV_IMPL"] = self.old


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# fgsm_step
# ---------------------------------------------------------------------------------------------
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), dtype=DTYPES, layout=LAYOUTS,
       eps=st.lists(st.floats(0, 2, allow_nan=False, width=32), min_size=1, max_size=4),
       bounds=st.tuples(st.floats(-1, 1, width=32), st.floats(0, 2, width=32)), seed=st.integers(0, 2**16),
       zero_grads=st.booleans())
def test_fgsm_step_property(shape, dtype, layout, eps, bounds, seed, zero_grads):
    lo, hi = min(bounds), max(bounds)
    g = _seeded(seed)
    x = torch.rand(tuple(shape), generator=g, dtype=dtype) * 3 - 1
    grad = torch.randn(tuple(shape), generator=g, dtype=dtype)
    if zero_grads and grad.numel():
        grad.view(-1)[::2] = 0  # sign(0) = 0: those pixels only get clamped
    xl, gl = _layout(x, layout), _layout(grad, layout)
    out = fgsm_step(xl, gl, eps, lo, hi)
    ref = torch.stack([torch.clamp(x + torch.tensor(e, dtype=torch.float64).to(dtype) * grad.sign(), lo, hi)
                       for e in eps])
    assert out.shape == (len(eps), *shape) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, **_tol(dtype))


# ---------------------------------------------------------------------------------------------
# compact_conv2d
# ---------------------------------------------------------------------------------------------
def conv_reference(x, w, b, stride, padding, dilation, groups, alpha, delta):
    u = F.conv2d(x, w, None, stride, padding, dilation, groups)
    n, c, h, wd = x.shape
    q = (x * x).reshape(n, groups, c // groups, h, wd).sum(2)
    ones = torch.ones(groups, 1, w.shape[2], w.shape[3], dtype=x.dtype)
    s = F.conv2d(q, ones, None, stride, padding, dilation, groups)
    y = alpha * u / (s.sqrt() + delta).repeat_interleave(w.shape[0] // groups, 1)
    return y if b is None else y + b.view(1, -1, 1, 1)


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 4)) if groups > 1 else draw(st.integers(1, 12))
    og = draw(st.integers(1, 7))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    for size, kk, p, d in ((h, k[0], padding[0], dilation[0]), (w, k[1], padding[1], dilation[1])):
        assume(size + 2 * p >= d * (kk - 1) + 1)  # at least one output position
    return dict(n=draw(st.integers(0, 3)), c=groups * cg, cout=groups * og, h=h, w=w, k=k, stride=stride,
                padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()),
                alpha=draw(st.floats(-3, 3, allow_nan=False)), delta=draw(st.sampled_from([0.0, 1e-3, 0.01, 0.5])),
                zero_patch=draw(st.booleans()))


@given(case=conv_cases(), dtype=DTYPES, layout=LAYOUTS, impl=st.sampled_from(["auto", "direct", "gemm"]),
       seed=st.integers(0, 2**16))
def test_compact_conv2d_property(case, dtype, layout, impl, seed):
    g = _seeded(seed)
    c = case
    x = torch.randn(c["n"], c["c"], c["h"], c["w"], generator=g, dtype=dtype)
    if c["delta"] == 0.0:
        # 0 / 0 at an all-zero patch (zeroed input or pure padding): the op's value there is a
        # convention (0), the composite's NaN
        assume(not c["zero_patch"] and c["padding"] == (0, 0))
    if c["zero_patch"]:
        x[..., : (c["h"] + 1) // 2, :] = 0  # whole patches of zeros (norm 0)
    w = torch.randn(c["cout"], c["c"] // c["groups"], *c["k"], generator=g, dtype=dtype)
    b = torch.randn(c["cout"], generator=g, dtype=dtype) if c["bias"] else None
    args = (c["stride"], c["padding"], c["dilation"], c["groups"], c["alpha"], c["delta"])
    xl = _layout(x, layout).requires_grad_(True)
    wl = _layout(w, layout).requires_grad_(True)
    bl = b.clone().requires_grad_(True) if b is not None else None
    with _Impl(impl):
        y = compact_conv2d(xl, wl, bl, *args)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    br = b.clone().requires_grad_(True) if b is not None else None
    r = conv_reference(xr, wr, br, *args)
    assert y.shape == r.shape and y.dtype == dtype
    tol = _tol(dtype)
    if c["delta"] < 1e-2:  # 1 / (norm + delta) amplifies rounding for tiny patches
        tol = {k: v * 100 for k, v in tol.items()}
    torch.testing.assert_close(y, r, **tol)
    if y.numel() == 0 or dtype == torch.float32 or c["zero_patch"]:
        return  # gradients against the composite: float64, away from the norm's kink at 0
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    with _Impl(impl):
        grads = torch.autograd.grad(y, [t for t in (xl, wl, bl) if t is not None], gy)
    refs = torch.autograd.grad(r, [t for t in (xr, wr, br) if t is not None], gy)
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got, ref, **tol)


# ---------------------------------------------------------------------------------------------
# compact_linear
# ---------------------------------------------------------------------------------------------
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=3), fin=st.integers(1, 9), fout=st.integers(1, 6),
       dtype=DTYPES, layout=LAYOUTS, bias=st.booleans(), alpha=st.floats(-3, 3, allow_nan=False),
       delta=st.sampled_from([1e-6, 0.01, 0.5]), seed=st.integers(0, 2**16))
def test_compact_linear_property(lead, fin, fout, dtype, layout, bias, alpha, delta, seed):
    g = _seeded(seed)
    x = torch.randn(*lead, fin, generator=g, dtype=dtype)
    w = torch.randn(fout, fin, generator=g, dtype=dtype)
    b = torch.randn(fout, generator=g, dtype=dtype) if bias else None
    xl = _layout(x, layout).requires_grad_(True)
    wl = _layout(w, layout).requires_grad_(True)
    y = compact_linear(xl, wl, b, alpha, delta)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    r = alpha * (xr @ wr.T) / (xr.norm(dim=-1, keepdim=True) + delta)
    if b is not None:
        r = r + b
    assert y.shape == (*lead, fout) and y._base is None and y.is_contiguous()
    tol = _tol(dtype) if delta > 1e-3 else {k: v * 100 for k, v in _tol(dtype).items()}
    torch.testing.assert_close(y, r, **tol)
    if y.numel() == 0:
        return
    gy = torch.randn(y.shape, generator=g, dtype=dtype)
    for got, ref in zip(torch.autograd.grad(y, (xl, wl), gy), torch.autograd.grad(r, (xr, wr), gy)):
        torch.testing.assert_close(got, ref, **tol)


# ---------------------------------------------------------------------------------------------
# kernel_dropout_eval
# ---------------------------------------------------------------------------------------------
@st.composite
def kd_cases(draw):
    k = draw(st.integers(1, 4))
    stride, padding, dilation = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    ext = dilation * (k - 1) + 1
    assume(h + 2 * padding >= ext and w + 2 * padding >= ext)
    ho, wo = (h + 2 * padding - ext) // stride + 1, (w + 2 * padding - ext) // stride + 1
    pool = draw(st.integers(0, 3))
    assume(pool == 0 or (ho >= pool and wo >= pool))
    cin = draw(st.integers(1, 5))
    return dict(n=draw(st.integers(0, 3)), cin=cin, cout=draw(st.integers(1, 9)), h=h, w=w, k=k, stride=stride,
                padding=padding, dilation=dilation, pool=pool, pool_stride=draw(st.integers(1, 3)) if pool else None,
                affine=draw(st.booleans()), relu=draw(st.booleans()),
                channels=draw(st.lists(st.integers(0, cin - 1), min_size=0, max_size=4)))


@given(case=kd_cases(), dtype=DTYPES, layout=LAYOUTS, seed=st.integers(0, 2**16))
def test_kernel_dropout_eval_property(case, dtype, layout, seed):
    c = case
    g = _seeded(seed)
    delta = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=g, dtype=dtype)
    weight = torch.randn(c["cout"], c["cin"], c["k"], c["k"], generator=g, dtype=dtype)
    geom = (c["stride"], c["padding"], c["dilation"])
    base = F.conv2d(torch.randn(delta.shape, generator=g, dtype=dtype), weight, None, *geom)
    scale = torch.rand(c["cout"], generator=g, dtype=dtype) + 0.5 if c["affine"] else None
    shift = torch.randn(c["cout"], generator=g, dtype=dtype) if c["affine"] else None
    chs = torch.tensor(c["channels"], dtype=torch.int64)
    out = kernel_dropout_eval(_layout(base, layout), _layout(delta, layout), _layout(weight, layout), chs, *geom,
                              scale=scale, shift=shift, relu=c["relu"], pool_kernel=c["pool"],
                              pool_stride=c["pool_stride"])
    refs = []
    for ch in c["channels"]:
        y = base - F.conv2d(delta[:, ch:ch + 1], weight[:, ch:ch + 1], None, *geom)
        if scale is not None:
            y = y * scale[:, None, None] + shift[:, None, None]
        if c["relu"]:
            y = torch.relu(y)
        if c["pool"]:
            y = F.max_pool2d(y, c["pool"], c["pool_stride"])
        refs.append(y)
    n_out = (len(c["channels"]), c["n"], c["cout"]) + (refs[0].shape[2:] if refs else out.shape[3:])
    assert out.shape == n_out and out.dtype == dtype
    if refs:
        torch.testing.assert_close(out, torch.stack(refs), **_tol(dtype))
