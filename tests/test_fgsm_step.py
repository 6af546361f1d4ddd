"""fgsm_step: the fused FGSM update for K step sizes, against the eager PyTorch formula."""
import math

import pytest
import torch
from torch.library import opcheck

import robustops
from robustops.ops import fgsm_step


def reference(x, g, eps, lo=0.0, hi=1.0):
    return torch.stack([torch.clamp(x + e * g.sign(), lo, hi) for e in eps])


def _dtypes(device):
    if device.type == "cuda":
        return [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float64]


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (1,), (2, 1000), (3, 1, 8, 8)])
@pytest.mark.parametrize("eps", [[0.1], [0.0, 0.05, 0.1, 0.3, 1.0, 2.5]])
def test_matches_reference(device, shape, eps):
    for dtype in _dtypes(device):
        x = torch.rand(shape, device=device).to(dtype)
        g = torch.randn(shape, device=device).to(dtype)
        g.view(-1)[0] = 0  # sign(0) must be 0
        out = fgsm_step(x, g, eps)
        assert out.shape == (len(eps), *shape)
        assert out.dtype == dtype and out.device == x.device
        torch.testing.assert_close(out, reference(x, g, eps), rtol=0, atol=0)


def test_large_multithreaded_and_odd_length():
    # Longer than one parallel chunk and not a multiple of the block size.
    x = torch.rand(3 * 16 * 1024 + 7)
    g = torch.randn_like(x)
    eps = [0.01 * k for k in range(10)]
    torch.testing.assert_close(fgsm_step(x, g, eps), reference(x, g, eps), rtol=0, atol=0)


def test_non_contiguous_and_channels_last(device):
    x = torch.rand(4, 3, 6, 6, device=device)
    g = torch.randn(4, 3, 6, 6, device=device)
    xt, gt = x.transpose(2, 3), g.transpose(2, 3)
    assert not xt.is_contiguous()
    torch.testing.assert_close(fgsm_step(xt, gt, [0.1, 0.2]), reference(xt, gt, [0.1, 0.2]), rtol=0, atol=0)
    xc = x.contiguous(memory_format=torch.channels_last)
    gc = g.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fgsm_step(xc, gc, [0.3]), reference(xc, gc, [0.3]), rtol=0, atol=0)


def test_empty_batch(device):
    x = torch.rand(0, 3, 4, 4, device=device)
    out = fgsm_step(x, torch.randn_like(x), [0.1, 0.2])
    assert out.shape == (2, 0, 3, 4, 4)


def test_clamp_bounds_and_nan_propagation():
    x = torch.tensor([0.0, 0.5, 1.0, float("nan")])
    g = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    out = fgsm_step(x, g, [0.7], lo=0.2, hi=0.9)
    torch.testing.assert_close(out, reference(x, g, [0.7], 0.2, 0.9), rtol=0, atol=0, equal_nan=True)
    assert math.isnan(out[0, 3].item())
    # NaN in the gradient has sign 0 like torch.sign, so x is only clamped.
    out = fgsm_step(torch.tensor([0.4]), torch.tensor([float("nan")]), [0.5])
    assert out.item() == pytest.approx(0.4)


def test_eps_forms_equivalent():
    x, g = torch.rand(2, 5), torch.randn(2, 5)
    a = fgsm_step(x, g, 0.1)
    b = fgsm_step(x, g, [0.1])
    c = fgsm_step(x, g, torch.tensor([0.1], dtype=torch.float32))
    assert a.shape == (1, 2, 5)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_opcheck():
    x, g = torch.rand(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for eps in (torch.tensor([0.1]), torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)):
        opcheck(torch.ops.robustops.fgsm_step.default, (x, g, eps, 0.0, 1.0))
    opcheck(torch.ops.robustops.fgsm_step.default, (x.double(), g.double(), torch.tensor([0.5]), -1.0, 2.0))


def test_not_differentiable():
    x = torch.rand(2, 3, requires_grad=True)
    out = torch.ops.robustops.fgsm_step(x, torch.randn(2, 3), torch.tensor([0.1]), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="not implemented"):
        out.sum().backward()


def test_torch_compile_fullgraph():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, g):
        return torch.ops.robustops.fgsm_step(x, g, torch.tensor([0.1, 0.2]), 0.0, 1.0)

    x, g = torch.rand(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(f(x, g), reference(x, g, [0.1, 0.2]))


# ---- bad input: Python wrapper ------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(eps=[-0.1]), ValueError, "eps must be >= 0"),
        (dict(eps=[float("inf")]), ValueError, "eps must be finite"),
        (dict(eps=[float("nan")]), ValueError, "eps must be finite"),
        (dict(eps=[]), ValueError, "at least one"),
        (dict(eps="abc"), TypeError, "eps must be a number"),
        (dict(eps=[0.1], lo=1.0, hi=0.0), ValueError, "lo <= hi"),
        (dict(eps=[0.1], lo=float("nan")), ValueError, "lo <= hi"),
    ],
)
def test_wrapper_rejects_bad_arguments(kwargs, exc, match):
    x, g = torch.rand(2, 3), torch.randn(2, 3)
    with pytest.raises(exc, match=match):
        fgsm_step(x, g, **kwargs)


def test_wrapper_rejects_mismatched_tensors():
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="grad must have the shape"):
        fgsm_step(x, torch.randn(3, 2), 0.1)
    with pytest.raises(TypeError, match="grad must have the dtype"):
        fgsm_step(x, torch.randn(2, 3, dtype=torch.float64), 0.1)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fgsm_step(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64), 0.1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fgsm_step([1.0], torch.randn(1), 0.1)


# ---- bad input: the raw op's TORCH_CHECKs (never a crash) ---------------------------------
@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda x, g: (x, g[:1], torch.tensor([0.1]), 0.0, 1.0), "same shape"),
        (lambda x, g: (x, g.double(), torch.tensor([0.1]), 0.0, 1.0), "same dtype"),
        (lambda x, g: (x, g, torch.tensor([[0.1]]), 0.0, 1.0), "1-D tensor"),
        (lambda x, g: (x, g, torch.tensor([], dtype=torch.float32), 0.0, 1.0), "at least one"),
        (lambda x, g: (x, g, torch.tensor([1]), 0.0, 1.0), "floating-point"),
        (lambda x, g: (x, g, torch.tensor([-0.1]), 0.0, 1.0), r"eps\[0\]"),
        (lambda x, g: (x, g, torch.tensor([0.1, float("nan")]), 0.0, 1.0), r"eps\[1\]"),
        (lambda x, g: (x, g, torch.tensor([0.1]), 1.0, 0.0), "lo must be <= hi"),
        (lambda x, g: (x, g, torch.tensor([0.1]), float("nan"), 1.0), "must not be NaN"),
        (lambda x, g: (x.half(), g.half(), torch.tensor([0.1]), 0.0, 1.0), "Half"),
    ],
)
def test_op_checks(make_args, match):
    x, g = torch.rand(2, 3), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.robustops.fgsm_step(*make_args(x, g))


def test_build_info():
    info = robustops.build_info()
    assert set(info) >= {"torch_version", "cuda", "openmp", "compiler", "debug"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)


def test_under_cpu_autocast_promotes_x_and_grad():
    """Under torch.autocast, fgsm_step runs in the promoted dtype of x and grad (no float32 floor:
    float32 inputs stay float32, a bfloat16 gradient with a float32 image gives float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 5, generator=g)
    grad = torch.randn(4, 3, 5, 5, generator=g)
    eps = [0.0, 0.1, 0.3]
    ref = robustops.ops.fgsm_step(x, grad.bfloat16().float(), eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = robustops.ops.fgsm_step(x, grad, eps)
        mixed = torch.ops.robustops.fgsm_step(x, grad.bfloat16(), torch.tensor(eps, dtype=torch.float64), 0.0, 1.0)
    assert out.dtype == torch.float32 and mixed.dtype == torch.float32
    torch.testing.assert_close(out, robustops.ops.fgsm_step(x, grad, eps))
    torch.testing.assert_close(mixed, ref)
    with pytest.raises(RuntimeError, match="same dtype"):  # outside autocast the op insists on one dtype
        torch.ops.robustops.fgsm_step(x, grad.bfloat16(), torch.tensor(eps, dtype=torch.float64), 0.0, 1.0)
