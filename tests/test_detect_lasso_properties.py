"""Property tests of the mu-Lasso's active-set polish (robustops.detect.lasso._polish_column)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from robustops.detect import project_l1_ball  # noqa: E402
from robustops.detect.lasso import _polish_column  # noqa: E402


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), m=st.integers(1, 30), mu=st.floats(0.05, 20.0),
       nonneg=st.booleans(), rank=st.integers(1, 30))
def test_polish_column_is_feasible_and_never_worse(seed, n, m, mu, nonneg, rank):
    """One active-set polish from any feasible point: feasible (||w||_1 <= mu, w >= 0 with
    nonneg), the objective never rises, and 'met' only with the duality gap within tol --
    including rank-deficient X (N < m, repeated columns)."""
    g = torch.Generator().manual_seed(seed)
    r = min(rank, n, m)
    X = torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, m, generator=g, dtype=torch.float64)
    X[:, : m // 2] = X[:, m - m // 2:] if m > 1 and seed % 3 == 0 else X[:, : m // 2]
    y = torch.randn(n, generator=g, dtype=torch.float64)
    v = torch.randn(m, generator=g, dtype=torch.float64) * torch.rand(m, generator=g, dtype=torch.float64).lt(0.5)
    w0 = project_l1_ball(v.clamp_min(0) if nonneg else v, mu)
    w, gap = _polish_column(X, y, w0, mu, nonneg, 1e-8, 50)

    def obj(w):
        return float(((X @ w - y) ** 2).sum())
    assert obj(w) <= obj(w0) * (1 + 1e-9) + 1e-9
    assert float(w.abs().sum()) <= mu * (1 + 1e-9)
    if nonneg:
        assert bool((w >= 0).all())
    if gap is not None:                                      # met tol: the gap it reports is the true one
        grad = 2 * X.T @ (X @ w - y)
        sup = float((-grad).clamp_min(0).max()) if nonneg else float(grad.abs().max())
        true_gap = mu * sup + float(w @ grad)
        assert true_gap <= 1e-8 * max(obj(w), 1e-8) + 1e-9 * max(1.0, obj(w0))
        assert abs(gap - max(true_gap, 0.0)) <= 1e-9 * max(1.0, obj(w0))
