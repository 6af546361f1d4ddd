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


def test_negative_pool_kernel_is_refused():
    """A negative pool_kernel is an error (it used to mean "no pool"), from Python and from C++."""
    base, delta, w = _case(1, 2, 2, 6, 6, 3, 1, 0, 1, torch.float32)
    chs = torch.arange(2)
    with pytest.raises(ValueError, match="pool_kernel"):
        kernel_dropout_eval(base, delta, w, chs, pool_kernel=-2)
    for pk, ps in [([-2, -2], [2, 2]), ([-1, 0], [0, 0]), ([2, 2], [-1, 2])]:
        with pytest.raises(RuntimeError, match="pool_kernel|pool_stride"):
            torch.ops.robustops.kernel_dropout_eval(base, delta, w, chs, [1, 1], [0, 0], [1, 1], None, None, False,
                                                    pk, ps)
    with pytest.raises(RuntimeError, match="pool_kernel"):  # the fake kernel agrees
        torch.ops.robustops.kernel_dropout_eval(base.to("meta"), delta.to("meta"), w.to("meta"), chs.to("meta"),
                                                [1, 1], [0, 0], [1, 1], None, None, False, [-2, -2], [2, 2])


_KD_GEOMETRY_CHILD = r"""
import json, sys
import torch
import robustops  # noqa: F401
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
delta = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=g)
w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
for s, p, d, ho in json.loads(sys.argv[1]):
    base = torch.randn(2, 4, ho, ho, dtype=torch.float64, generator=g)
    rec = {"geom": [s, p, d]}
    try:
        out = torch.ops.robustops.kernel_dropout_eval(base, delta, w, torch.arange(3), [s, s], [p, p], [d, d],
                                                      None, None, False, [0, 0], [0, 0])
        rec["diff"] = (out - base).abs().max().item()
        rec["shape"] = list(out.shape)
    except RuntimeError as e:
        rec["error"] = str(e).splitlines()[0]
    print(json.dumps(rec), flush=True)
print("SURVIVED", flush=True)
"""


def test_absurd_geometry_is_checked_not_a_crash():
    """Stride / padding / dilation near 2**61..2**63 (issue 9: used to segfault): overflow is a
    RuntimeError; a geometry whose plane would be absurdly large is refused by name."""
    import json
    import os
    import subprocess
    import sys

    m = 2**31 - 1
    cases = [
        (2**62, 2**61, 1, 2),
        (1, 0, 2**62, 6),
        (1, 2**62, 1, 6),
        (2**63 - 1, 2**62 - 1, 1, 1),
        (m, m, 1, 3),                # accepted values, but the zero-padded plane would be ~2**64 elements
        (m, 0, 1, 1),                # valid: one output position
        (1, 2**10, 2**10, 8),        # valid: only the centre tap lands inside
    ]
    proc = subprocess.run([sys.executable, "-c", _KD_GEOMETRY_CHILD, json.dumps(cases)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"child died (rc={proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "SURVIVED"
    recs = [json.loads(line) for line in lines[:-1]]
    for rec in recs[:4]:
        assert "kernel_dropout_eval" in rec.get("error", "") and "must be <= 2147483647" in rec["error"], rec
    assert "overflows int64" in recs[4].get("error", ""), recs[4]
    assert recs[5]["shape"] == [3, 2, 4, 1, 1] and recs[5]["diff"] > 0, recs[5]
    assert recs[6]["shape"] == [3, 2, 4, 8, 8], recs[6]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_cpu_autocast(dtype):
    """Inside torch.autocast the consumer's base output is half while delta and the weight are float32:
    the op promotes everything to float32 and matches the float32 result."""
    base, delta, w = _case(2, 3, 4, 7, 7, 3, 1, 1, 1, torch.float32)
    chs = torch.arange(3)
    with torch.autocast("cpu", dtype=dtype):
        out = kernel_dropout_eval(base.to(dtype), delta, w, chs, padding=1, relu=True, pool_kernel=2)
    assert out.dtype == torch.float32
    ref = reference(base.to(dtype).float(), delta, w, chs, padding=1, relu=True, pool_kernel=2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
