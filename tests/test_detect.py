"""robustops.detect: features/hooks, mu-Lasso vs scikit-learn's Lasso, the tensor forest vs
scikit-learn's, the three detectors, evaluation, save/load, bad input, model never changed."""
from __future__ import annotations

import hashlib
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from robustops import data, models
from robustops.attacks import FGSM
from robustops.detect import (ActivationRecorder, FeatureSqueezingDetector, MuLassoConvergenceWarning, NICDetector,
                              NoAdversarialError, NoLayersError, NotFittedError, RelevantNeuronDetector, ShapeMismatchError,
                              TensorForest, bit_depth, evaluate_detector, extract, median_filter, mu_lasso,
                              neuron_features, normalize_features, project_l1_ball, relevant_neurons)
from robustops.detect.relevant import DETECTOR_MAX_ITER

sklearn = pytest.importorskip("sklearn")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adv(digits_cnn_trained):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    atk = FGSM(model, eps=0.3)
    return atk(xtr, ytr), atk(xte, yte)


@pytest.fixture(scope="module")
def fitted(digits_cnn_trained, adv):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    return RelevantNeuronDetector(model, mu=10, n_estimators=60, seed=0).fit(xtr, adv[0])


def checksum(model):
    h = hashlib.sha256()
    for t in list(model.parameters()) + list(model.buffers()):
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest(), [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


# ----------------------------------------------------------------------------- features
def test_recorder_features_match_manual_and_hooks_removed(digits_cnn_trained):
    model, xtr, *_ = digits_cnn_trained
    x = xtr[:16]
    with ActivationRecorder(model) as rec:
        model(x)
    assert rec.names == ["conv1", "conv2", "fc1"]            # every conv/linear but the logits layer
    with torch.no_grad():
        c1 = model.conv1(x)
        ref = c1.pow(2).sum((2, 3))
    torch.testing.assert_close(rec.features["conv1"], ref, rtol=1e-5, atol=1e-6)
    assert rec.concat().shape == (16, 16 + 32 + 64)
    assert all(not m._forward_hooks for m in model.modules())


def test_recorded_outputs_survive_inplace_relu():
    """torchvision-style Conv2d -> ReLU(inplace=True): a reduction that is a view of the layer's
    output (``reduce="none"``, NIC's flatten) must not see the ReLU overwrite it afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        ref = model[0](x).flatten(1)
    assert bool((ref < 0).any())                             # the ReLU would change them
    with torch.no_grad(), ActivationRecorder(model, ["0"], reduce="none") as rec:
        model(x)
    torch.testing.assert_close(rec.features["0"], ref)
    # the default per-channel norms (no alias check: always new tensors) are of the pre-ReLU output
    with torch.no_grad(), ActivationRecorder(model, ["0"]) as rec:
        model(x)
    torch.testing.assert_close(rec.features["0"], ref.view(5, 4, 36).square().sum(2))
    nic = NICDetector(model, layers=["0"])
    acts, _ = nic._activations(x)
    np.testing.assert_allclose(acts[0], ref.double().numpy(), rtol=1e-6, atol=1e-7)


def test_recorder_removes_hooks_when_body_raises(digits_cnn_trained):
    model, *_ = digits_cnn_trained
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationRecorder(model):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_normalizations():
    a = torch.rand(5, 3) + 0.1
    b = torch.rand(5, 7) + 0.1
    l2 = normalize_features([a, b], "l2")
    torch.testing.assert_close(torch.linalg.vector_norm(l2[:, :3], dim=1), torch.ones(5))
    torch.testing.assert_close(torch.linalg.vector_norm(l2[:, 3:], dim=1), torch.ones(5))
    s = normalize_features([a, b], "sum_l2")
    torch.testing.assert_close(torch.linalg.vector_norm(s, dim=1), torch.ones(5))
    # each layer block proportional to block / block.sum()
    ratio = s[:, :3] / (a / a.sum(1, keepdim=True))
    torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, 3))
    with pytest.raises(ValueError, match="normalize"):
        normalize_features([a], "l1")


def test_sum_l2_is_sparser_than_l2(digits_cnn_trained):
    model, xtr, *_ = digits_cnn_trained
    counts = {}
    for nz in ("l2", "sum_l2"):
        e = extract(model, xtr[:600], normalize=nz)
        sets = relevant_neurons(e.features.double(), e.predictions, 10.0, 10, max_iter=DETECTOR_MAX_ITER, tol=1e-4)
        counts[nz] = sum(len(s) for s in sets)
    assert counts["sum_l2"] < counts["l2"]


# ----------------------------------------------------------------------------- mu-Lasso
def test_project_l1_ball_against_bisection():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(40, 5, generator=g, dtype=torch.float64) * 3
    r = torch.tensor([0.5, 1.0, 2.0, 200.0, 7.0], dtype=torch.float64)
    w = project_l1_ball(v, r)
    for j in range(5):
        if v[:, j].abs().sum() <= r[j]:
            assert torch.equal(w[:, j], v[:, j])
            continue
        lo, hi = 0.0, float(v[:, j].abs().max())                  # independent: bisection on theta
        for _ in range(200):
            th = (lo + hi) / 2
            if (v[:, j].abs() - th).clamp_min(0).sum() > r[j]:
                lo = th
            else:
                hi = th
        ref = torch.sign(v[:, j]) * (v[:, j].abs() - hi).clamp_min(0)
        torch.testing.assert_close(w[:, j], ref, rtol=0, atol=1e-9)
        assert abs(float(w[:, j].abs().sum()) - float(r[j])) < 1e-9


@pytest.mark.parametrize("mode", ["gram", "direct", "auto"])
@pytest.mark.parametrize("alpha", [0.02, 0.1])
def test_mu_lasso_matches_sklearn_lasso_at_same_l1_norm(mode, alpha):
    """Penalised Lasso (scikit-learn, coordinate descent) at alpha has some L1 norm t; the
    constrained problem with mu = t has the same solution: same objective, same support."""
    from sklearn.linear_model import Lasso
    g = torch.Generator().manual_seed(1)
    n, m, c = 200, 60, 3
    X = torch.randn(n, m, generator=g, dtype=torch.float64)
    W_true = torch.zeros(m, c, dtype=torch.float64)
    W_true[:6] = torch.randn(6, c, generator=g, dtype=torch.float64)
    Y = X @ W_true + 0.3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    ref = np.stack([Lasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=200000)
                    .fit(X.numpy(), Y[:, j].numpy()).coef_ for j in range(c)], 1)
    ref = torch.from_numpy(ref)
    mu = ref.abs().sum(0)
    with warnings.catch_warnings():                          # converges (or reaches the rounding floor)
        warnings.simplefilter("error", MuLassoConvergenceWarning)
        res = mu_lasso(X, Y, mu, mode=mode, tol=1e-12)
    f_ref = ((X @ ref - Y) ** 2).sum(0)
    rel = (res.objective - f_ref).abs() / f_ref
    assert float(rel.max()) < 1e-4
    assert torch.equal(res.W != 0, ref.abs() > 1e-10)
    assert bool((res.W.abs().sum(0) <= mu * (1 + 1e-9)).all())


@pytest.mark.parametrize("mode", ["gram", "direct"])
def test_mu_lasso_nonneg_matches_sklearn_positive_lasso(mode):
    """nonneg=True: the constrained problem over {w >= 0, sum(w) <= mu} against scikit-learn's
    Lasso(positive=True) at the matching L1 norm (same objective, same support)."""
    from sklearn.linear_model import Lasso
    g = torch.Generator().manual_seed(3)
    n, m, c = 150, 40, 3
    X = torch.rand(n, m, generator=g, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.arange(n) % c, c).double()
    X[:, :c] += 0.5 * Y                                       # a few features respond to each class
    ref = torch.from_numpy(np.stack([Lasso(alpha=0.01, fit_intercept=False, positive=True, tol=1e-14,
                                           max_iter=200000).fit(X.numpy(), Y[:, j].numpy()).coef_
                                     for j in range(c)], 1))
    mu = ref.sum(0)
    res = mu_lasso(X, Y, mu, mode=mode, tol=1e-12, nonneg=True)
    f_ref = ((X @ ref - Y) ** 2).sum(0)
    assert float(((res.objective - f_ref).abs() / f_ref).max()) < 1e-4
    assert bool((res.W >= 0).all()) and bool((res.W.sum(0) <= mu * (1 + 1e-9)).all())
    assert torch.equal(res.W > 0, ref > 1e-10)
    # the signed problem at the same budget reaches a lower objective (negative weights help)
    assert bool((mu_lasso(X, Y, mu, tol=1e-12).objective < res.objective).all())


def test_mu_lasso_warns_when_its_iterations_run_out():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(80, 30, generator=g, dtype=torch.float64)
    Y = torch.randn(80, 2, generator=g, dtype=torch.float64)
    with pytest.warns(MuLassoConvergenceWarning, match="max_iter=3 "):
        res = mu_lasso(X, Y, 1.0, max_iter=3, tol=1e-8)
    assert not res.converged
    # a tolerance below the arithmetic's reach stops at the rounding floor: not converged, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", MuLassoConvergenceWarning)
        res = mu_lasso(X, Y, 1.0, tol=1e-300)
    assert not res.converged and res.iterations < 3000 - 1


def test_mu_lasso_polish_on_nearly_collinear_float32_features():
    """Nearly collinear float32 features (every column ~1): SPG alone is still far off after
    3,000 iterations (relative gaps 4e-3 to 2e-2, 4-50 weights where the optimum has 2-3); the
    polish ends at scikit-learn's solution within a few dozen iterations."""
    from sklearn.linear_model import Lasso
    g = torch.Generator().manual_seed(1)
    X = 1 + 1e-2 * torch.rand(200, 50, generator=g)
    Y = torch.nn.functional.one_hot(torch.arange(200) % 3, 3).float()
    with pytest.warns(MuLassoConvergenceWarning):
        plain = mu_lasso(X, Y, 5.0, tol=1e-6, polish=False)
    res = mu_lasso(X, Y, 5.0, tol=1e-6)
    assert res.converged and res.iterations < 200 and res.W.dtype == torch.float32
    assert float(res.W.abs().sum(0).max()) <= 5.0 * (1 + 1e-6)
    Xd, Yd, Wd = X.double(), Y.double(), res.W.double()
    grad = 2 * Xd.T @ (Xd @ Wd - Yd)
    from sklearn.exceptions import ConvergenceWarning
    for j in range(3):
        with warnings.catch_warnings():                      # CD crawls on collinear columns: gap ~3e-10, support settled
            warnings.simplefilter("ignore", ConvergenceWarning)
            ref = torch.from_numpy(Lasso(alpha=float(grad[:, j].abs().max()) / 400, fit_intercept=False, tol=1e-10,
                                         max_iter=1_000_000).fit(Xd.numpy(), Yd[:, j].numpy()).coef_)
        assert torch.equal(res.W[:, j] != 0, ref.abs() > 1e-9), f"class {j}"
    # the objective against a float64 solve (the penalty read from a float32 W is too rough here
    # for scikit-learn's L1 norm to match mu to 1e-6)
    exact = mu_lasso(Xd, Yd, 5.0, tol=1e-12)
    f_ours = ((Xd @ Wd - Yd) ** 2).sum(0)                    # float64: X ~ 1 cancels in float32
    assert float(((f_ours - exact.objective).abs() / exact.objective).max()) <= 1e-6
    assert int((plain.W != 0).sum()) > int((res.W != 0).sum())


def test_mu_lasso_polish_reaches_the_optimum_where_spg_alone_stalls(digits_cnn_trained):
    """On the detector's own (ill-conditioned) features SPG alone leaves 1e-3 relative gaps after
    thousands of iterations; the active-set polish reaches tol, and each class's solution is
    scikit-learn's Lasso at the penalty read from the KKT conditions (same support, objective)."""
    from sklearn.linear_model import Lasso
    model, xtr, *_ = digits_cnn_trained
    e = extract(model, xtr[:600])
    X, p = e.features.double(), e.predictions
    Y = torch.nn.functional.one_hot(p, 10).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MuLassoConvergenceWarning)
        res = mu_lasso(X, Y, 10.0, max_iter=DETECTOR_MAX_ITER, tol=1e-6)
    assert res.converged
    with pytest.warns(MuLassoConvergenceWarning):            # the same budget of iterations without it
        plain = mu_lasso(X, Y, 10.0, max_iter=res.iterations + 1, tol=1e-6, polish=False)
    assert not plain.converged
    g = 2 * X.T @ (X @ res.W - Y)
    n = X.shape[0]
    for j in torch.unique(p).tolist():
        alpha = float(g[:, j].abs().max()) / (2 * n)          # Lasso's 1/(2n) ||Xw - y||^2 + alpha ||w||_1
        ref = torch.from_numpy(Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=1_000_000)
                               .fit(X.numpy(), Y[:, j].numpy()).coef_)
        f_ref = float(((X @ ref - Y[:, j]) ** 2).sum())
        assert abs(float(res.objective[j]) - f_ref) <= 1e-6 * f_ref
        assert torch.equal(res.W[:, j] != 0, ref.abs() > 1e-9), f"class {j}"
    assert float(plain.gap.max()) > 10 * float(res.gap.max())


def test_mu_lasso_warning_says_when_samples_are_too_few():
    """Stopping short with more non-zero weights than samples: the warning names N and says that
    more samples or a smaller mu help (not only max_iter); with N > m it says raise max_iter."""
    g = torch.Generator().manual_seed(0)
    X = torch.rand(20, 60, generator=g, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.arange(20) % 2, 2).double()
    with pytest.warns(MuLassoConvergenceWarning, match="N=20 samples.*smaller mu"):
        mu_lasso(X, Y, 100.0, max_iter=10, tol=1e-6)
    X = torch.randn(80, 30, generator=g, dtype=torch.float64)
    with pytest.warns(MuLassoConvergenceWarning, match="raise max_iter$"):
        mu_lasso(X, torch.randn(80, 2, generator=g, dtype=torch.float64), 1.0, max_iter=3, tol=1e-8)


def test_mu_lasso_inactive_constraint_is_least_squares():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(100, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(100, 2, generator=g, dtype=torch.float64) * 0.1
    ls = torch.linalg.lstsq(X, Y).solution
    res = mu_lasso(X, Y, 1e3, tol=1e-12)
    torch.testing.assert_close(res.W, ls, rtol=1e-6, atol=1e-8)
    assert res.converged


def test_mu_lasso_labels_and_errors():
    X = torch.rand(30, 8, dtype=torch.float64)
    y = torch.arange(30) % 3
    r1 = mu_lasso(X, y, 2.0)
    r2 = mu_lasso(X, torch.nn.functional.one_hot(y, 3).double(), 2.0)
    torch.testing.assert_close(r1.W, r2.W)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mu"):
            mu_lasso(X, y, bad)
    with pytest.raises(TypeError, match="mu"):
        mu_lasso(X, y, "ten")
    with pytest.raises(ValueError, match="Y must be"):
        mu_lasso(X, y[:10], 1.0)
    with pytest.raises(TypeError, match="floating"):
        mu_lasso(X.long(), y, 1.0)
    with pytest.raises(ValueError, match="finite"):
        mu_lasso(X * float("nan"), y, 1.0)


def test_relevant_neurons_absent_class_is_empty():
    X = torch.rand(40, 10, dtype=torch.float64)
    y = torch.zeros(40, dtype=torch.long)
    y[20:] = 2
    sets = relevant_neurons(X, y, 1.0, num_classes=4)
    assert len(sets) == 4 and sets[1].numel() == 0 and sets[3].numel() == 0 and sets[0].numel() > 0


# ----------------------------------------------------------------------------- tensor forest
def _adjacent_float32_data(rng, n, d):
    """Features with many pairs of adjacent float32 values, so that splits fall between them:
    scikit-learn's float64 midpoint is then not a float32, and rounding it to the nearest float32
    (instead of down) would send one of the two values the wrong way."""
    X = rng.normal(size=(n, d)).astype(np.float32)
    base = (1000 + rng.normal(size=n // 4)).astype(np.float32)   # ulp 6e-5: scikit-learn splits between them
    X[: n // 4, 0] = base
    X[n // 4: n // 2, 0] = np.nextafter(base, np.float32(np.inf))
    return X


def test_unconverged_mu_lasso_warns_and_the_detector_default_converges(digits_cnn_trained):
    """Relevant sets are the support of the mu-Lasso optimum: a solve cut short keeps spurious
    small weights (a larger, path-dependent support) and says so; the detector's default cap
    converges, to the support of a much tighter solve."""
    model, xtr, *_ = digits_cnn_trained
    e = extract(model, xtr[:600])
    X, p = e.features.double(), e.predictions
    with pytest.warns(MuLassoConvergenceWarning, match="max_iter=50"):
        capped = relevant_neurons(X, p, 10.0, 10, max_iter=50, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MuLassoConvergenceWarning)
        sets = relevant_neurons(X, p, 10.0, 10, max_iter=DETECTOR_MAX_ITER, tol=1e-4)
        tight = relevant_neurons(X, p, 10.0, 10, max_iter=DETECTOR_MAX_ITER, tol=1e-6)
    n = sum(len(s) for s in sets)
    assert sum(len(s) for s in capped) > n
    differ = sum(len(set(a.tolist()) ^ set(b.tolist())) for a, b in zip(sets, tight))
    assert differ <= max(1, n // 50)                         # the same support up to a weight or two at ~0


def test_tensor_forest_equals_sklearn_exactly():
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.default_rng(0)
    for n_cls in (2, 3):
        X = _adjacent_float32_data(rng, 400, 12)
        y = (X[:, 0] > 1000).astype(int) ^ (np.arange(400) < 100)       # split between the adjacent values
        if n_cls == 3:
            y = y + (X[:, 3] > 0.8)
        rf = RandomForestClassifier(n_estimators=25, random_state=0).fit(X, y)
        t64 = np.concatenate([e.tree_.threshold[e.tree_.children_left >= 0] for e in rf.estimators_])
        t32 = t64.astype(np.float32)                         # the data does exercise the rounding direction:
        assert bool(np.isin(t32[t32.astype(np.float64) > t64], X[100:200, 0]).any())   # a value sits on one
        tf = TensorForest.from_sklearn(rf)
        Xt = np.concatenate([X[:200], rng.normal(size=(200, 12)).astype(np.float32)])
        p = tf.predict_proba(torch.from_numpy(Xt))
        assert p.dtype == torch.float64
        assert np.array_equal(p.numpy(), rf.predict_proba(Xt))           # bit for bit
        back = TensorForest.from_state_dict(tf.state_dict())
        assert torch.equal(back.predict_proba(torch.from_numpy(Xt)), p)


@pytest.mark.parametrize("form", ["leaf_masks", "walk"])
def test_specialized_forest_by_group_equals_sklearn_on_zero_padded_input(form):
    """specialize(columns, blocks): each sample read as if the inputs of other groups were 0
    (the detector's with-label design), from a wider matrix, in both evaluation forms."""
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.default_rng(1)
    g, width = 4, 30
    columns = torch.from_numpy(rng.choice(width, 12, replace=False))
    blocks = torch.from_numpy(np.repeat(np.arange(g), 3))
    blocks[-1] = 0                                           # group 3 has 2 inputs, group 0 has 4
    wide = rng.random((600, width)).astype(np.float32)
    grp = rng.integers(0, g, 600)
    z = wide[:, columns.numpy()] * (blocks.numpy()[None, :] == grp[:, None])
    y = (z.sum(1) + 0.3 * rng.normal(size=600) > 0.9).astype(int)
    rf = RandomForestClassifier(n_estimators=30, random_state=0).fit(z[:400], y[:400])
    sp = TensorForest.from_sklearn(rf).specialize(columns, blocks, g, form=form)
    assert sp.form == form
    ref = rf.predict_proba(z)
    x, gr = torch.from_numpy(wide), torch.from_numpy(grp)
    assert np.array_equal(sp.predict_proba(x, gr).numpy(), ref)
    assert np.array_equal(sp.predict_proba(x, gr, column=1).numpy(), ref[:, 1])
    # one sample at a time and odd batches give the same (no state kept between calls)
    one = torch.cat([sp.predict_proba(x[i:i + 1], gr[i:i + 1], column=1) for i in range(40)])
    assert np.array_equal(one.numpy(), ref[:40, 1])
    assert np.array_equal(sp.predict_proba(x[7:44], gr[7:44], column=1).numpy(), ref[7:44, 1])
    # the same forest reading a narrower matrix (only the columns it reads, in another order)
    keep = torch.unique(columns).flip(0)
    mapping = torch.full((width,), -1, dtype=torch.int64)
    mapping[keep] = torch.arange(keep.numel())
    narrow = sp.reading(mapping, keep.numel())
    assert np.array_equal(narrow.predict_proba(x[:, keep].contiguous(), gr).numpy(), ref)
    assert np.array_equal(sp.predict_proba(x, gr).numpy(), ref)              # the original is unchanged
    mapping[keep[0]] = -1
    with pytest.raises(ValueError, match="outside"):
        sp.reading(mapping, keep.numel())
    with pytest.raises(ValueError, match="groups"):
        sp.predict_proba(x, None)
    with pytest.raises(ValueError, match="groups"):
        sp.predict_proba(x[:3], torch.tensor([0, 1, g]))
    with pytest.raises(ValueError, match="blocks"):                    # inputs of a group that would be ignored
        TensorForest.from_sklearn(rf).specialize(columns, blocks, g - 1)
    with pytest.raises(ValueError, match="form"):
        TensorForest.from_sklearn(rf).specialize(columns, blocks, g, form="table")
    # tables over the size limit: "auto" walks, "leaf_masks" says why it cannot
    assert TensorForest.from_sklearn(rf).specialize(columns, blocks, g, max_bytes=10).form == "walk"
    with pytest.raises(ValueError, match="max_bytes"):
        TensorForest.from_sklearn(rf).specialize(columns, blocks, g, form="leaf_masks", max_bytes=10)
    # a non-finite input the forest reads is an error, not a silent route
    bad = x.clone()
    bad[0, int(columns[blocks == int(gr[0])][0])] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sp.predict_proba(bad, gr)


def test_thousand_trees_with_many_thresholds_use_leaf_masks_exactly():
    """The detector's default size: 1000 fully grown trees on inputs with thousands of distinct
    thresholds (too many cells for tables, trees with more than 126 leaves: the compiled op's
    general word count) are evaluated by per-tree leaf masks, bit for bit scikit-learn's."""
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.default_rng(5)
    g, width, n = 3, 12, 900
    columns = torch.from_numpy(rng.choice(width, 7, replace=False))
    blocks = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    wide = rng.random((n + 300, width)).astype(np.float32)
    grp = rng.choice(g, n + 300, p=[0.8, 0.1, 0.1])        # group 0: trees with > 126 leaves
    z = wide[:, columns.numpy()] * (blocks.numpy()[None, :] == grp[:, None])
    y = (z.sum(1) + 0.4 * rng.normal(size=n + 300) > 0.6).astype(int) + (z[:, 0] > 0.7)   # 3 classes, noisy
    rf = RandomForestClassifier(n_estimators=1000, random_state=0).fit(z[:n], y[:n])
    sp = TensorForest.from_sklearn(rf).specialize(columns, blocks, g)
    assert sp.form == "leaf_masks"
    assert sp.masks.words >= 3                               # 3+ words per tree (> 126 leaves): the op's general path
    ref = rf.predict_proba(z)
    x, gr = torch.from_numpy(wide), torch.from_numpy(grp)
    assert np.array_equal(sp.predict_proba(x, gr).numpy(), ref)
    assert np.array_equal(sp.predict_proba(x, gr, column=2).numpy(), ref[:, 2])
    one = torch.cat([sp.predict_proba(x[i:i + 1], gr[i:i + 1], column=1) for i in range(5)])
    assert np.array_equal(one.numpy(), ref[:5, 1])


def test_pure_and_impure_leaves_and_deep_trees_on_one_input():
    """Fully grown trees (pure leaves) and trees with impure leaves give scikit-learn's
    probabilities; a deep forest on one input (more than 255 cuts per tree: the int16 bin map)
    too."""
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.default_rng(4)
    X = rng.random((300, 2)).astype(np.float32)
    y = ((X[:, 0] - 0.5) * (X[:, 1] - 0.4) + 0.05 * rng.normal(size=300) > 0).astype(int)
    Xt = np.concatenate([X, rng.random((200, 2)).astype(np.float32)])
    for leaf in (1, 7):
        rf = RandomForestClassifier(n_estimators=50, min_samples_leaf=leaf, random_state=0).fit(X, y)
        sp = TensorForest.from_sklearn(rf).specialize(torch.arange(2))
        assert sp.form == "leaf_masks"
        assert np.array_equal(sp.predict_proba(torch.from_numpy(Xt)).numpy(), rf.predict_proba(Xt))
    x1 = rng.random((1500, 1)).astype(np.float32)
    y1 = rng.integers(0, 2, 1500)                                       # noise: one leaf per sample
    rf = RandomForestClassifier(n_estimators=5, random_state=0).fit(x1, y1)
    sp = TensorForest.from_sklearn(rf).specialize(torch.arange(1))
    assert sp.masks.bin_map.dtype == torch.int16
    xt = np.concatenate([x1, rng.random((300, 1)).astype(np.float32)])
    assert np.array_equal(sp.predict_proba(torch.from_numpy(xt)).numpy(), rf.predict_proba(xt))


def test_leaf_masks_with_many_inputs_in_one_group():
    """A group whose trees cut more inputs than numpy has dimensions (64), read from 90 columns."""
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.default_rng(2)
    X = rng.random((500, 90)).astype(np.float32)
    y = (X[:, :45].sum(1) > X[:, 45:].sum(1)).astype(int)
    rf = RandomForestClassifier(n_estimators=40, max_depth=4, random_state=0).fit(X, y)
    sp = TensorForest.from_sklearn(rf).specialize(torch.arange(90))
    used = {int(f) for e in rf.estimators_ for f in e.tree_.feature[e.tree_.feature >= 0]}
    assert sp.form == "leaf_masks" and len(used) > 64
    assert np.array_equal(sp.predict_proba(torch.from_numpy(X)).numpy(), rf.predict_proba(X))


def test_saved_forest_with_a_cycle_is_rejected():
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.default_rng(3)
    X = rng.random((100, 4)).astype(np.float32)
    rf = RandomForestClassifier(n_estimators=3, random_state=0).fit(X, (X[:, 0] > 0.5).astype(int))
    d = TensorForest.from_sklearn(rf).state_dict()
    d["left"] = d["left"].clone()
    d["left"][0, 1] = 0                                      # node 1 points back to the root
    with pytest.raises(ValueError, match="trees"):
        TensorForest.from_state_dict(d)


# ----------------------------------------------------------------------------- detector
def test_relevant_detector_detects_fgsm_and_model_unchanged(digits_cnn_trained, adv):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    model.train()                                            # a training-mode model must come back as it was
    before = checksum(model)
    det = RelevantNeuronDetector(model, mu=10, n_estimators=60, seed=0).fit(xtr, adv[0])
    ok = model.eval()(adv[1]).argmax(1) != model(xte).argmax(1)
    model.train()
    res = evaluate_detector(det, xte, adv[1][ok])
    assert checksum(model) == before
    model.eval()
    assert set(res) == {"accuracy", "tpr", "fpr", "roc_auc", "n_clean", "n_adv"}
    assert res["n_clean"] == xte.shape[0] and res["n_adv"] == int(ok.sum())
    assert res["accuracy"] > 0.8 and res["roc_auc"] > 0.85
    assert all(not m._forward_hooks for m in model.modules())
    # relevant sets: shared = clean & adv, symdiff = clean ^ adv
    for j, d in det.relevant.items():
        assert set(d["shared"]) == set(d["clean"]) & set(d["adv"])
        assert set(d["symdiff"]) == set(d["clean"]) ^ set(d["adv"])
    # sparse at mu=10 with the default normalisation
    assert max(det.selected_count()) < det.n_features_ / 2


def test_score_predict_consistent_and_deterministic(fitted, digits_cnn_trained, adv):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    s = fitted.score(xte)
    assert s.shape == (xte.shape[0],) and s.dtype == torch.float64
    assert bool(((s >= 0) & (s <= 1)).all())
    assert torch.equal(fitted.predict(xte), s > 0.5)
    assert fitted.predict(xte).dtype == torch.bool
    # the scikit-learn forest gives the same probabilities
    feats, logits = fitted.features_and_logits(xte)
    z = fitted._design(feats, logits.argmax(1)).numpy()
    proba = fitted.classifier_.predict_proba(z)[:, 1]
    assert torch.equal(s, torch.from_numpy(proba))                         # exact, float64 as sklearn
    assert np.array_equal(fitted.predict(xte).numpy(), fitted.classifier_.predict(z) == 1)
    # batched == whole, DataLoader == tensor
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xte, yte), batch_size=37)
    torch.testing.assert_close(fitted.score(loader), s)
    again = RelevantNeuronDetector(model, mu=10, n_estimators=60, seed=0).fit(xtr, adv[0])
    assert torch.equal(again.score(xte), s)


def test_score_computes_only_the_layers_the_forest_reads(fitted, digits_cnn_trained, adv):
    """With normalize="l2" every layer is normalised on its own, so score / predict hook only
    the layers holding a selected neuron, and give exactly the scores of the full descriptors.
    With "sum_l2" (one L2 norm over all layers) they need every layer."""
    model, xtr, ytr, xte, yte = digits_cnn_trained
    c, a = extract(model, xtr, fitted.layer_names), extract(model, adv[0], fitted.layer_names)
    fc1 = sum(c.sizes[:2])                                   # fc1's neurons: the last layer's columns
    late = {j: {k: [i for i in v if i >= fc1] for k, v in d.items()} for j, d in fitted.relevant.items()}
    det = RelevantNeuronDetector(model, mu=10, n_estimators=60, seed=0)
    det.fit_features(c.features, c.predictions, a.features, a.predictions, c.num_classes, layer_sizes=c.sizes,
                     sample_shape=c.sample_shape, relevant=late)
    assert det._read_layers == ["fc1"]
    seen = {}

    def spy(name):                                           # hooks on the layer when it runs (ours + this one)
        def hook(module, inputs, output):
            seen[name] = len(module._forward_hooks)
        return hook

    handles = [model.get_submodule(n).register_forward_hook(spy(n)) for n in det.layer_names]
    try:
        s = det.score(xte)
        assert seen == {"conv1": 1, "conv2": 1, "fc1": 2}
        seen.clear()
        feats, logits = det.features_and_logits(xte)
        assert seen == {"conv1": 2, "conv2": 2, "fc1": 2}
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(s, det.score_features(feats, logits.argmax(1)))
    z = det._design(feats, logits.argmax(1)).numpy()
    assert torch.equal(s, torch.from_numpy(det.classifier_.predict_proba(z)[:, 1]))
    assert fitted._read_layers == [n for n in fitted.layer_names
                                   if any(name.startswith(n + ":") for name in fitted.neuron_names(
                                       fitted._index.tolist()))]
    cs, as_ = (extract(model, v, fitted.layer_names, "sum_l2") for v in (xtr, adv[0]))
    sparse = RelevantNeuronDetector(model, mu=10, n_estimators=20, seed=0, normalize="sum_l2")
    sparse.fit_features(cs.features, cs.predictions, as_.features, as_.predictions, cs.num_classes,
                        layer_sizes=cs.sizes, sample_shape=cs.sample_shape, relevant=late)
    assert sparse._read_layers == sparse.layer_names
    f2, l2 = sparse.features_and_logits(xte)
    assert torch.equal(sparse.score(xte), sparse.score_features(f2, l2.argmax(1)))


def test_use_label_zeroes_other_blocks(fitted, digits_cnn_trained):
    model, xtr, *_ = digits_cnn_trained
    feats, logits = fitted.features_and_logits(xtr[:50])
    pred = logits.argmax(1)
    z = fitted._design(feats, pred)
    blocks = fitted._block
    assert bool((z[blocks[None, :].expand_as(z) != pred[:, None]] == 0).all())


def test_variants_and_loaders(digits_cnn_trained, adv):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    n = 600
    loader_c = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr[:n], ytr[:n]), batch_size=100)
    loader_a = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(adv[0][:n], ytr[:n]), batch_size=100)
    for variant in ("clean", "symdiff"):
        # a capped solve (solver_kw) is allowed and says that it stopped short
        det = RelevantNeuronDetector(model, mu=20, variant=variant, use_label=False, n_estimators=20,
                                     solver_kw={"max_iter": 2000, "polish": False})
        with pytest.warns(MuLassoConvergenceWarning, match="max_iter=2000"):
            det.fit(loader_c, loader_a)
        key = variant
        assert det.selected_count() == [len(det.relevant[j][key]) for j in range(10)]
        assert det.score(xte[:10]).shape == (10,)


def test_save_load_roundtrip_and_safe_format(fitted, digits_cnn_trained, tmp_path):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    p = tmp_path / "det.pt"
    fitted.save(p)
    state = torch.load(p, weights_only=True)                 # plain containers and tensors only
    assert state["format"].startswith("robustops.detect.RelevantNeuronDetector")
    loaded = RelevantNeuronDetector.load(p, model)
    assert torch.equal(loaded.score(xte), fitted.score(xte))
    assert loaded.relevant == fitted.relevant
    # a file with an arbitrary pickled object is refused, not executed
    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": state["format"], "x": Boom()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        RelevantNeuronDetector.load(evil, model)
    # a model with other layer sizes
    with pytest.raises(ValueError, match="neurons"):
        RelevantNeuronDetector.load(p, models.small_cnn(channels=(8, 32)))
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved"):
        RelevantNeuronDetector.load(tmp_path / "other.pt", model)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(digits_cnn_trained, adv):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    with pytest.raises(ValueError, match="mu"):
        RelevantNeuronDetector(model, mu=0)
    with pytest.raises(ValueError, match="mu"):
        RelevantNeuronDetector(model, mu=-3)
    with pytest.raises(ValueError, match="variant"):
        RelevantNeuronDetector(model, variant="union")
    with pytest.raises(NoLayersError):
        RelevantNeuronDetector(nn.Sequential(nn.Flatten(), nn.Softmax(1)))
    with pytest.raises(NoLayersError):
        RelevantNeuronDetector(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))   # only the logits layer
    det = RelevantNeuronDetector(model, n_estimators=5)
    with pytest.raises(NotFittedError):
        det.predict(xte)
    with pytest.raises(NotFittedError):
        det.score(xte)
    with pytest.raises(NotFittedError):
        evaluate_detector(det, xte, xte)
    with pytest.raises(ShapeMismatchError):
        det.fit(xtr, adv[0][:, :, :7, :7])
    with pytest.raises(ShapeMismatchError):
        det.fit(xtr, adv[0][:100])
    with pytest.raises(NoAdversarialError):
        det.fit(xtr, xtr.clone())                            # "attack" that changed nothing
    with pytest.raises(ValueError, match=r"\[lo, hi\]"):
        det.fit(xtr * 3, adv[0])
    with pytest.raises(TypeError):
        det.fit("images", adv[0])
    before = checksum(model)
    with pytest.raises(ShapeMismatchError):
        det.fit(xtr, adv[0][:, :, :7, :7])
    assert checksum(model) == before
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_removed_when_model_raises():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            self.conv(x)
            raise RuntimeError("model failure")

    m = Bad()
    det = RelevantNeuronDetector(m, n_estimators=2)
    with pytest.raises(RuntimeError, match="model failure"):
        det.fit(torch.rand(4, 1, 5, 5), torch.rand(4, 1, 5, 5))
    assert all(not mod._forward_hooks for mod in m.modules())
    assert m.training and all(p.requires_grad for p in m.parameters())


# ----------------------------------------------------------------------------- Feature Squeezing
def test_squeezers_match_numpy_and_scipy():
    from scipy.ndimage import median_filter as sp_median
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 9, 7, generator=g, dtype=torch.float64)
    for k in (2, 3):
        ref = sp_median(x.numpy(), size=(1, 1, k, k), mode="reflect")
        torch.testing.assert_close(median_filter(x, k), torch.from_numpy(ref), rtol=0, atol=0)
    torch.testing.assert_close(bit_depth(x, 1), torch.from_numpy(np.round(x.numpy())))
    torch.testing.assert_close(bit_depth(x, 3), torch.from_numpy(np.round(x.numpy() * 7) / 7))


def test_feature_squeezing_threshold_and_scores(digits_cnn_trained, adv, tmp_path):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    fs = FeatureSqueezingDetector(model, fpr=0.1).fit(xtr)
    s_tr = fs.score(xtr)
    assert abs(float((s_tr > fs.threshold_).float().mean()) - 0.1) < 0.02
    # score against a direct computation
    x = xte[:20]
    with torch.no_grad():
        p = model(x).softmax(1)
        d1 = (model(bit_depth(x, 1)).softmax(1) - p).abs().sum(1)
        d2 = (model(median_filter(x, 2)).softmax(1) - p).abs().sum(1)
    torch.testing.assert_close(fs.score(x), torch.maximum(d1, d2), rtol=1e-5, atol=1e-6)
    res = evaluate_detector(fs, xte, adv[1])
    assert 0 <= res["accuracy"] <= 1 and res["n_adv"] == adv[1].shape[0]
    fs.save(tmp_path / "fs.pt")
    assert FeatureSqueezingDetector.load(tmp_path / "fs.pt", model).threshold_ == fs.threshold_
    with pytest.raises(ValueError, match="squeezer"):
        FeatureSqueezingDetector(model, squeezers=("blur",))
    with pytest.raises(ValueError, match="fpr"):
        FeatureSqueezingDetector(model, fpr=1.5)
    with pytest.raises(NotFittedError):
        FeatureSqueezingDetector(model).predict(xte)


# ----------------------------------------------------------------------------- NIC
def test_nic_fits_on_clean_and_flags_strong_noise(digits_cnn_trained, adv):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    before = checksum(model)
    nic = NICDetector(model, nu=0.1, fpr=0.05, seed=0).fit(xtr)
    assert checksum(model) == before
    assert nic.layer_names == ["conv1", "conv2", "fc1", "fc2"]
    assert len(nic.vi_) == 4 and len(nic.pi_) == 3
    fp = float(nic.predict(xte).float().mean())
    assert fp < 0.2
    # off-manifold inputs (uniform noise) violate the invariants
    noise = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(nic.predict(noise).float().mean()) > 0.9
    res = evaluate_detector(nic, xte, adv[1])
    assert res["roc_auc"] > 0.5
    with pytest.raises(ShapeMismatchError):
        nic.score(torch.rand(3, 1, 9, 9))
    with pytest.raises(ValueError, match="nu"):
        NICDetector(model, nu=0)
