"""kernel_dropout_eval: the compiled consumer op against a pure-PyTorch reference."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import robustops  # noqa: F401
from robustops.ops import kernel_dropout_eval


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small problems: one intra-op thread is faster and avoids OpenMP oversubscription on
    shared CI machines. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def reference(base, delta, w, chs, stride=1, padding=0, dilation=1, scale=None, shift=None, relu=False,
              pool_kernel=0, pool_stride=None):
    outs = []
    for c in chs.tolist():
        y = base - F.conv2d(delta[:, c:c + 1], w[:, c:c + 1], None, stride, padding, dilation)
        if scale is not None:
            y = y * scale[:, None, None] + shift[:, None, None]
        if relu:
            y = torch.relu(y)
        if pool_kernel:
            y = F.max_pool2d(y, pool_kernel, pool_stride or pool_kernel)
        outs.append(y)
    return torch.stack(outs)


def _case(N, Cin, Cout, H, W, k, stride, padding, dilation, dtype, device="cpu"):
    delta = torch.randn(N, Cin, H, W, dtype=dtype, device=device)
    w = torch.randn(Cout, Cin, k, k, dtype=dtype, device=device)
    base = F.conv2d(torch.randn(N, Cin, H, W, dtype=dtype, device=device), w, None, stride, padding, dilation)
    return base, delta, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geom", [
    dict(k=3, stride=1, padding=0, dilation=1),
    dict(k=3, stride=1, padding=1, dilation=1),
    dict(k=3, stride=2, padding=1, dilation=1),
    dict(k=1, stride=2, padding=0, dilation=1),
    dict(k=3, stride=1, padding=2, dilation=2),
    dict(k=5, stride=3, padding=2, dilation=1),
])
@pytest.mark.parametrize("post", [
    dict(),
    dict(relu=True),
    dict(relu=True, pool_kernel=2),
    dict(scale=True, relu=True),
    dict(pool_kernel=3, pool_stride=2),
])
def test_matches_reference(device, dtype, geom, post):
    k = geom["k"]
    base, delta, w = _case(3, 5, 4, 11, 9, k, geom["stride"], geom["padding"], geom["dilation"], dtype, device)
    post = dict(post)
    if post.pop("scale", False):
        post["scale"] = torch.rand(4, dtype=dtype, device=device) + 0.5
        post["shift"] = torch.randn(4, dtype=dtype, device=device)
    if post.get("pool_kernel", 0) and base.shape[-1] < post["pool_kernel"]:
        pytest.skip("map smaller than the pool")
    chs = torch.tensor([4, 0, 2, 2], dtype=torch.long, device=device)
    args = dict(stride=geom["stride"], padding=geom["padding"], dilation=geom["dilation"], **post)
    out = kernel_dropout_eval(base, delta, w, chs, **args)
    ref = reference(base, delta, w, chs, **args)
    assert out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_non_contiguous_and_empty():
    base, delta, w = _case(4, 3, 2, 8, 8, 3, 1, 1, 1, torch.float32)
    chs = torch.arange(3)
    dt = delta.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    assert not dt.is_contiguous() or True
    d_cl = delta.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(kernel_dropout_eval(base, d_cl, w, chs, padding=1),
                               reference(base, delta, w, chs, padding=1), rtol=1e-5, atol=1e-5)
    out = kernel_dropout_eval(base, delta, w, torch.empty(0, dtype=torch.long), padding=1)
    assert out.shape == (0, 4, 2, 8, 8)
    out = kernel_dropout_eval(base[:0], delta[:0], w, chs, padding=1)
    assert out.shape == (3, 0, 2, 8, 8)


def test_large_parallel():
    base, delta, w = _case(64, 32, 32, 26, 26, 3, 1, 0, 1, torch.float32)
    chs = torch.arange(32)
    torch.testing.assert_close(kernel_dropout_eval(base, delta, w, chs, relu=True, pool_kernel=2),
                               reference(base, delta, w, chs, relu=True, pool_kernel=2), rtol=1e-4, atol=1e-4)


def test_nan_propagates_through_relu_and_pool():
    base, delta, w = _case(1, 2, 1, 6, 6, 3, 1, 0, 1, torch.float32)
    base[0, 0, 0, 0] = float("nan")
    out = kernel_dropout_eval(base, delta, w, torch.arange(2), relu=True, pool_kernel=2)
    assert torch.isnan(out[:, 0, 0, 0, 0]).all()


def test_opcheck():
    base, delta, w = _case(2, 3, 4, 7, 7, 3, 1, 1, 1, torch.float32)
    chs = torch.tensor([1, 2])
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    opcheck(torch.ops.robustops.kernel_dropout_eval,
            (base, delta, w, chs, [1, 1], [1, 1], [1, 1], scale, shift, True, [2, 2], [2, 2]))
    opcheck(torch.ops.robustops.kernel_dropout_eval,
            (base, delta, w, chs, [1, 1], [1, 1], [1, 1], None, None, False, [0, 0], [0, 0]))


def test_not_differentiable():
    base, delta, w = _case(1, 2, 2, 5, 5, 3, 1, 0, 1, torch.float32)
    base.requires_grad_(True)
    out = kernel_dropout_eval(base, delta, w, torch.arange(2))
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_bad_arguments():
    base, delta, w = _case(2, 3, 4, 7, 7, 3, 1, 0, 1, torch.float32)
    chs = torch.arange(3)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel_dropout_eval(base, delta, w, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="does not match"):
        kernel_dropout_eval(base, delta, w, chs, padding=1)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel_dropout_eval(base, delta.double(), w, chs)
    with pytest.raises(TypeError, match="int64"):
        kernel_dropout_eval(base, delta, w, chs.int())
    w_bad = w.clone()
    w_bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="finite"):
        kernel_dropout_eval(base, delta, w_bad, chs)
    with pytest.raises(RuntimeError, match="groups=1"):
        kernel_dropout_eval(base, delta, w[:, :2], chs)
    with pytest.raises(ValueError, match="both scale and shift"):
        kernel_dropout_eval(base, delta, w, chs, scale=torch.ones(4))
