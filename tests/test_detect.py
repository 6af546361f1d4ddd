"""robustops.detect: features/hooks, mu-Lasso vs scikit-learn's Lasso, the tensor forest vs
scikit-learn's, the three detectors, evaluation, save/load, bad input, model never changed."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from robustops import data, models
from robustops.attacks import FGSM
from robustops.detect import (ActivationRecorder, FeatureSqueezingDetector, NICDetector, NoAdversarialError,
                              NoLayersError, NotFittedError, RelevantNeuronDetector, ShapeMismatchError,
                              TensorForest, bit_depth, evaluate_detector, extract, median_filter, mu_lasso,
                              neuron_features, normalize_features, project_l1_ball, relevant_neurons)

sklearn = pytest.importorskip("sklearn")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    xtr, ytr = data.as_tensors(data.load("digits", split="train"))
    xte, yte = data.as_tensors(data.load("digits", split="test"))
    model = models.small_cnn()
    models.train(model, (xtr, ytr), epochs=6, optimizer="adam", lr=3e-3, seed=0)
    model.eval()
    return model, xtr, ytr, xte, yte


@pytest.fixture(scope="module")
def adv(digits):
    model, xtr, ytr, xte, yte = digits
    atk = FGSM(model, eps=0.3)
    return atk(xtr, ytr), atk(xte, yte)


@pytest.fixture(scope="module")
def fitted(digits, adv):
    model, xtr, ytr, xte, yte = digits
    return RelevantNeuronDetector(model, mu=10, n_estimators=60, seed=0).fit(xtr, adv[0])


def checksum(model):
    h = hashlib.sha256()
    for t in list(model.parameters()) + list(model.buffers()):
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest(), [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


# ----------------------------------------------------------------------------- features
def test_recorder_features_match_manual_and_hooks_removed(digits):
    model, xtr, *_ = digits
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


def test_recorder_removes_hooks_when_body_raises(digits):
    model, *_ = digits
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


def test_sum_l2_is_sparser_than_l2(digits):
    model, xtr, *_ = digits
    counts = {}
    for nz in ("l2", "sum_l2"):
        e = extract(model, xtr[:600], normalize=nz)
        sets = relevant_neurons(e.features.double(), e.predictions, 10.0, 10, max_iter=1000, tol=1e-4)
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
    res = mu_lasso(X, Y, mu, mode=mode, tol=1e-12)
    f_ref = ((X @ ref - Y) ** 2).sum(0)
    rel = (res.objective - f_ref).abs() / f_ref
    assert float(rel.max()) < 1e-4
    assert torch.equal(res.W != 0, ref.abs() > 1e-10)
    assert bool((res.W.abs().sum(0) <= mu * (1 + 1e-9)).all())


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
def test_tensor_forest_equals_sklearn():
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 12)).astype(np.float32)
    y = (X[:, 0] + X[:, 3] ** 2 + 0.3 * rng.normal(size=400) > 1).astype(int)
    rf = RandomForestClassifier(n_estimators=25, random_state=0).fit(X, y)
    tf = TensorForest.from_sklearn(rf)
    Xt = rng.normal(size=(300, 12)).astype(np.float32)
    torch.testing.assert_close(tf.predict_proba(torch.from_numpy(Xt)).double(),
                               torch.from_numpy(rf.predict_proba(Xt)), rtol=0, atol=1e-6)
    back = TensorForest.from_state_dict(tf.state_dict())
    assert torch.equal(back.predict_proba(torch.from_numpy(Xt)), tf.predict_proba(torch.from_numpy(Xt)))


# ----------------------------------------------------------------------------- detector
def test_relevant_detector_detects_fgsm_and_model_unchanged(digits, adv):
    model, xtr, ytr, xte, yte = digits
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


def test_score_predict_consistent_and_deterministic(fitted, digits, adv):
    model, xtr, ytr, xte, yte = digits
    s = fitted.score(xte)
    assert s.shape == (xte.shape[0],) and s.dtype == torch.float32
    assert bool(((s >= 0) & (s <= 1)).all())
    assert torch.equal(fitted.predict(xte), s > 0.5)
    assert fitted.predict(xte).dtype == torch.bool
    # the scikit-learn forest gives the same probabilities
    feats, logits = fitted.features_and_logits(xte)
    z = fitted._design(feats, logits.argmax(1)).numpy()
    torch.testing.assert_close(s.double(), torch.from_numpy(fitted.classifier_.predict_proba(z)[:, 1]),
                               rtol=0, atol=1e-6)
    # batched == whole, DataLoader == tensor
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xte, yte), batch_size=37)
    torch.testing.assert_close(fitted.score(loader), s)
    again = RelevantNeuronDetector(model, mu=10, n_estimators=60, seed=0).fit(xtr, adv[0])
    assert torch.equal(again.score(xte), s)


def test_use_label_zeroes_other_blocks(fitted, digits):
    model, xtr, *_ = digits
    feats, logits = fitted.features_and_logits(xtr[:50])
    pred = logits.argmax(1)
    z = fitted._design(feats, pred)
    blocks = fitted._block
    assert bool((z[blocks[None, :].expand_as(z) != pred[:, None]] == 0).all())


def test_variants_and_loaders(digits, adv):
    model, xtr, ytr, xte, yte = digits
    n = 600
    loader_c = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr[:n], ytr[:n]), batch_size=100)
    loader_a = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(adv[0][:n], ytr[:n]), batch_size=100)
    for variant in ("clean", "symdiff"):
        det = RelevantNeuronDetector(model, mu=20, variant=variant, use_label=False, n_estimators=20).fit(
            loader_c, loader_a)
        key = variant
        assert det.selected_count() == [len(det.relevant[j][key]) for j in range(10)]
        assert det.score(xte[:10]).shape == (10,)


def test_save_load_roundtrip_and_safe_format(fitted, digits, tmp_path):
    model, xtr, ytr, xte, yte = digits
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
def test_bad_inputs(digits, adv):
    model, xtr, ytr, xte, yte = digits
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


def test_feature_squeezing_threshold_and_scores(digits, adv, tmp_path):
    model, xtr, ytr, xte, yte = digits
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
def test_nic_fits_on_clean_and_flags_strong_noise(digits, adv):
    model, xtr, ytr, xte, yte = digits
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
