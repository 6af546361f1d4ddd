"""apgd_step and fab_projection (AutoAttack's compiled ops) against eager references, the authors'
projection code (when pyautoattack is installed), an LP solver, invariants and bad input."""
import math

import numpy as np
import pytest
import torch
from torch.library import opcheck

from robustops.ops import apgd_step, apgd_step_reference, fab_projection, fab_projection_reference


def _apgd_args(n=5, shape=(3, 4, 4), dtype=torch.float32, eps=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, *shape), generator=g, dtype=dtype)
    x = (x0 + eps * (2 * torch.rand(x0.shape, generator=g, dtype=dtype) - 1)).clamp(0, 1)
    xp = (x0 + eps * (2 * torch.rand(x0.shape, generator=g, dtype=dtype) - 1)).clamp(0, 1)
    grad = torch.randn(x0.shape, generator=g, dtype=dtype)
    grad[0] = 0  # sign(0) = 0 and the L2 normalisation of a zero gradient
    step = 2 * eps * torch.rand(n, generator=g, dtype=dtype)
    return x, xp, x0, grad, step


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [1.0, 0.75])
def test_apgd_step_matches_reference(norm, dtype, momentum):
    eps = 0.1 if norm == "Linf" else 0.8
    x, xp, x0, grad, step = _apgd_args(dtype=dtype, eps=eps)
    out = apgd_step(x, xp, x0, grad, step, eps, momentum, 0.0, 1.0, norm)
    ref = apgd_step_reference(x, xp, x0, grad, step, eps, momentum, 0.0, 1.0, norm)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # invariants: inside the ball and the box
    d = (out - x0).reshape(out.shape[0], -1)
    nrm = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert (nrm <= eps * (1 + 1e-5)).all()
    assert out.min() >= 0 and out.max() <= 1


def test_apgd_step_authors_formula_linf():
    # The authors' two-stage update written out with their exact ops (torch.min/max then clamp).
    x, xp, x0, grad, step = _apgd_args(n=7, shape=(1, 8, 8), eps=0.3, seed=3)
    eps = 0.3
    s = step.view(-1, 1, 1, 1)
    x1 = torch.clamp(torch.min(torch.max(x + s * torch.sign(grad), x0 - eps), x0 + eps), 0.0, 1.0)
    ref = torch.clamp(torch.min(torch.max(x + (x1 - x) * 0.75 + (x - xp) * 0.25, x0 - eps), x0 + eps), 0.0, 1.0)
    torch.testing.assert_close(apgd_step(x, xp, x0, grad, step, eps, 0.75), ref, rtol=0, atol=0)


def test_apgd_step_large_batch_threads_and_layouts():
    x, xp, x0, grad, step = _apgd_args(n=300, shape=(3, 9, 7), eps=0.05)
    for norm in ("Linf", "L2"):
        torch.testing.assert_close(apgd_step(x, xp, x0, grad, step, 0.05, 0.75, norm=norm),
                                   apgd_step_reference(x, xp, x0, grad, step, 0.05, 0.75, norm=norm),
                                   rtol=1e-6, atol=1e-6)
    xt = x.transpose(2, 3)
    out = apgd_step(xt, xp.transpose(2, 3), x0.transpose(2, 3), grad.transpose(2, 3), step, 0.05)
    torch.testing.assert_close(out, apgd_step_reference(xt, xp.transpose(2, 3), x0.transpose(2, 3),
                                                        grad.transpose(2, 3), step, 0.05), rtol=0, atol=0)
    e = torch.rand(0, 3, 2, 2)
    assert apgd_step(e, e, e, e, torch.zeros(0), 0.1).shape == (0, 3, 2, 2)


def test_apgd_step_bad_input():
    x, xp, x0, grad, step = _apgd_args()
    with pytest.raises(ValueError, match="norm"):
        apgd_step(x, xp, x0, grad, step, 0.1, norm="L1")
    with pytest.raises(ValueError, match="momentum"):
        apgd_step(x, xp, x0, grad, step, 0.1, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        apgd_step(x, xp, x0, grad, step, float("nan"))
    with pytest.raises(ValueError, match="x_prev"):
        apgd_step(x, xp[:2], x0, grad, step, 0.1)
    with pytest.raises(TypeError, match="grad"):
        apgd_step(x, xp, x0, grad.double(), step, 0.1)
    with pytest.raises(ValueError, match="step_size"):
        apgd_step(x, xp, x0, grad, step[:2], 0.1)
    with pytest.raises(RuntimeError, match="norm"):  # the C++ check, below the wrapper
        torch.ops.robustops.apgd_step(x, xp, x0, grad, step, 0.1, 0.75, 0.0, 1.0, "L7")
    with pytest.raises(RuntimeError, match="eps"):
        torch.ops.robustops.apgd_step(x, xp, x0, grad, step, float("inf"), 0.75, 0.0, 1.0, "Linf")


def test_apgd_step_opcheck():
    x, xp, x0, grad, step = _apgd_args(n=3)
    for norm in ("Linf", "L2"):
        opcheck(torch.ops.robustops.apgd_step.default, (x, xp, x0, grad, step, 0.1, 0.75, 0.0, 1.0, norm),
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---- fab_projection ------------------------------------------------------------------------------
def _proj_args(b=16, d=20, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, d, generator=g, dtype=dtype)
    w = torch.randn(b, d, generator=g, dtype=dtype)
    w[0, :5] = 0          # inactive coordinates
    w[1] = 0              # no direction at all
    t[2, :3] = 0.0        # at the box faces
    t[2, 3:6] = 1.0
    off = torch.randn(b, generator=g, dtype=dtype) * torch.rand(b, generator=g, dtype=dtype) * 3
    bb = (w * t).sum(1) + off  # some hyperplanes near, some out of reach
    bb[3] = (w[3] * t[3]).sum()  # point already on the hyperplane
    return t, w, bb


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fab_projection_matches_reference(norm, dtype):
    t, w, b = _proj_args(dtype=dtype, b=64, d=37)
    d = fab_projection(t, w, b, 0.0, 1.0, norm)
    ref = fab_projection_reference(t, w, b, 0.0, 1.0, norm)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(d, ref, rtol=tol, atol=tol)
    # inside the box; on the hyperplane whenever the hyperplane is reachable
    assert ((t + d) >= -1e-6).all() and ((t + d) <= 1 + 1e-6).all()
    on = ((w * (t + d)).sum(1) - b).abs() <= 1e-4 * (1 + b.abs())
    reachable = (w.clamp(max=0).sum(1) <= b) & (b <= w.clamp(min=0).sum(1))  # min / max of <w, z> on the box
    assert on[reachable].all()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_fab_projection_matches_authors_code(norm):
    fp = pytest.importorskip("pyautoattack.fab_projections")
    t, w, b = _proj_args(b=200, d=64, seed=1)
    w[1] = torch.randn(64)  # the authors' L2 code divides by w
    ref = (fp.projection_linf if norm == "Linf" else fp.projection_l2)(t.clone(), w.clone(), b.clone())
    d = fab_projection(t, w, b, 0.0, 1.0, norm)
    torch.testing.assert_close(d, ref, rtol=1e-4, atol=2e-5)


def test_fab_projection_is_the_lp_optimum():
    linprog = pytest.importorskip("scipy.optimize").linprog
    t, w, b = _proj_args(b=12, d=8, dtype=torch.float64, seed=2)
    d = fab_projection(t, w, b, 0.0, 1.0, "Linf")
    for i in range(t.shape[0]):
        ti, wi, bi = t[i].numpy(), w[i].numpy(), float(b[i])
        D = ti.size
        # variables (d_1..d_D, s): minimise s, -s <= d_j <= s, <w, t + d> = b, 0 <= t + d <= 1
        c = np.zeros(D + 1)
        c[-1] = 1
        A = np.zeros((2 * D, D + 1))
        A[:D, :D], A[:D, -1] = np.eye(D), -1
        A[D:, :D], A[D:, -1] = -np.eye(D), -1
        bounds = [(-ti[j], 1 - ti[j]) for j in range(D)] + [(0, None)]
        r = linprog(c, A_ub=A, b_ub=np.zeros(2 * D), A_eq=np.r_[wi, 0][None], b_eq=[bi - wi @ ti],
                    bounds=bounds, method="highs")
        if r.status == 0:
            assert float(d[i].abs().max()) == pytest.approx(r.x[-1], abs=1e-8)
        else:  # infeasible: the op moves every active coordinate to its face
            assert r.status == 2


def test_fab_projection_bad_input_and_opcheck():
    t, w, b = _proj_args(b=4, d=6)
    with pytest.raises(ValueError, match="norm"):
        fab_projection(t, w, b, norm="L1")
    with pytest.raises(ValueError, match="b must be"):
        fab_projection(t, w, b[:2])
    with pytest.raises(ValueError, match="points and w"):
        fab_projection(t, w[:, :3], b)
    with pytest.raises(TypeError, match="w must be"):
        fab_projection(t, w.double(), b)
    with pytest.raises(RuntimeError, match="finite"):
        bad = w.clone()
        bad[0, 0] = math.nan
        torch.ops.robustops.fab_projection(t, bad, b, 0.0, 1.0, "Linf")
    assert fab_projection(t[:0], w[:0], b[:0]).shape == (0, 6)
    for norm in ("Linf", "L2"):
        opcheck(torch.ops.robustops.fab_projection.default, (t, w, b, 0.0, 1.0, norm),
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
