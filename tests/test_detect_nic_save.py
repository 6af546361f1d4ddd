"""NICDetector persistence (robustops.detect.nic): its own RBF one-class SVM decision function
against scikit-learn's, save / load round trip (bit-identical scores), the file's safe format,
and the named errors for wrong files and mismatched models; the model is never changed."""
from __future__ import annotations

import copy
import hashlib
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from robustops import models
from robustops.detect import FeatureSqueezingDetector, NICDetector, NotFittedError
from robustops.detect import nic as nic_mod
from robustops.detect import relevant as relevant_mod

pytest.importorskip("sklearn")


def checksum(model):
    h = hashlib.sha256()
    for t in list(model.parameters()) + list(model.buffers()):
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest(), [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.fixture(scope="module")
def nic(digits_cnn_trained):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    return NICDetector(model, nu=0.1, seed=0).fit(xtr[:800])


@pytest.fixture(scope="module")
def probe_images(digits_cnn_trained):
    """Clean test images, noisy ones and uniform noise: near and far from the clean region."""
    model, xtr, ytr, xte, yte = digits_cnn_trained
    g = torch.Generator().manual_seed(3)
    noisy = (xte[:100] + 0.3 * torch.randn(100, 1, 8, 8, generator=g)).clamp(0, 1)
    return torch.cat([xte, noisy, torch.rand(50, 1, 8, 8, generator=g)])


def _svm_inputs(det, x):
    """The inputs of every one-class SVM (value then provenance), as ``fit`` / ``score`` build them."""
    acts, _ = det._activations(x)
    reduced = [det._apply(steps, a) for steps, a in zip(det.reducers_, acts)]
    prov = [det._probe(p, z) for p, z in zip(det.probes_, reduced)]
    return reduced + [np.hstack([prov[i], prov[i + 1]]) for i in range(len(prov) - 1)]


def test_own_decision_function_matches_sklearn(nic, probe_images):
    """The array-based RBF decision function equals OneClassSVM.decision_function (libsvm) on
    every fitted invariant, for clean, noisy and uniform-noise images; the scores that use it
    equal the standardisation of scikit-learn's decision values."""
    inputs = _svm_inputs(nic, probe_images)
    ours = nic.vi_ + nic.pi_
    assert len(nic.sklearn_svms_) == len(ours) == len(inputs) == 7
    ref_cols = []
    for k, (sk, own, z) in enumerate(zip(nic.sklearn_svms_, ours, inputs)):
        np.testing.assert_array_equal(sk.intercept_, -sk.offset_)
        assert own.offset == float(sk.offset_[0]) and own.gamma == sk._gamma
        assert own.support_vectors.shape[0] >= 0.1 * 640                   # nu = 0.1 of 640 training images, at least
        ref = sk.decision_function(z)
        assert ref.std() > 1e-3                                           # not a constant: the test can fail
        np.testing.assert_allclose(own.decision_function(z), ref, rtol=0, atol=1e-10, err_msg=nic.invariant_names[k])
        # blocks of rows give the same values as one block
        np.testing.assert_allclose(own.decision_function(z, block=7), ref, rtol=0, atol=1e-10)
        ref_cols.append(ref)
    ref_scores = -(np.stack(ref_cols, 1) - nic.loc_) / nic.scale_
    np.testing.assert_allclose(nic.invariant_scores(probe_images).numpy(), ref_scores, rtol=0, atol=1e-8)


def test_scaler_matches_sklearn_standard_scaler():
    from sklearn.preprocessing import StandardScaler
    a = np.random.default_rng(0).normal(3.0, 2.0, (50, 6))
    a[:, 2] = 1.5                                                          # constant column: scale 1
    sk = StandardScaler().fit(a)
    own = nic_mod._Scaler.fit(a)
    b = np.random.default_rng(1).normal(size=(9, 6))
    np.testing.assert_array_equal(own.transform(b), sk.transform(b))


def test_save_load_roundtrip_is_bit_identical_and_model_unchanged(nic, digits_cnn_trained, probe_images, tmp_path):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    fresh = copy.deepcopy(model).train()                                   # a user's model in training mode
    before, before_fixture = checksum(fresh), checksum(model)
    p = tmp_path / "nic.pt"
    nic.save(p)
    loaded = NICDetector.load(p, fresh)
    assert loaded.is_fitted and loaded.sklearn_svms_ is None
    assert loaded.layer_names == nic.layer_names and loaded.layer_sizes_ == nic.layer_sizes_
    assert loaded.sample_shape_ == nic.sample_shape_ == (1, 8, 8) and loaded.num_classes_ == 10
    assert loaded.threshold_ == nic.threshold_
    assert (loaded.nu, loaded.fpr, loaded.pool, loaded.max_dims, loaded.seed, loaded.batch_size, loaded.probe_output) \
        == (nic.nu, nic.fpr, nic.pool, nic.max_dims, nic.seed, nic.batch_size, nic.probe_output)
    assert torch.equal(loaded.invariant_scores(probe_images), nic.invariant_scores(probe_images))
    s = nic.score(probe_images)
    assert torch.equal(loaded.score(probe_images), s)
    pred = nic.predict(probe_images)
    assert torch.equal(loaded.predict(probe_images), pred)
    assert 0 < int(pred.sum()) < len(pred)                                 # both decisions occur
    # a loaded detector saves the same file contents again
    loaded.save(tmp_path / "again.pt")
    a, b = torch.load(p, weights_only=True), torch.load(tmp_path / "again.pt", weights_only=True)
    assert a.keys() == b.keys() and a["config"] == b["config"]
    for sa, sb in zip(a["value_svms"] + a["provenance_svms"], b["value_svms"] + b["provenance_svms"]):
        assert torch.equal(sa["support_vectors"], sb["support_vectors"]) and sa["offset"] == sb["offset"]
    assert checksum(fresh) == before and all(m.training for m in fresh.modules())
    assert checksum(model) == before_fixture


def test_roundtrip_with_other_settings(digits_cnn_trained, probe_images, tmp_path):
    """Pooling, fewer PCA dimensions, softmax probes and a subset of layers survive the round trip."""
    model, xtr, ytr, xte, yte = digits_cnn_trained
    det = NICDetector(model, layers=["conv2", "fc1"], nu=0.2, fpr=0.1, pool=2, max_dims=16, probe_output="softmax",
                      calibration=0.3, max_train=200, seed=4, batch_size=77).fit(xtr[:400])
    det.save(tmp_path / "nic.pt")
    loaded = NICDetector.load(tmp_path / "nic.pt", model)
    assert loaded.layer_names == ["conv2", "fc1"] and loaded.layer_sizes_ == [32 * 2 * 2, 64]
    assert (loaded.nu, loaded.fpr, loaded.pool, loaded.max_dims, loaded.probe_output, loaded.calibration,
            loaded.max_train, loaded.seed, loaded.batch_size) == (0.2, 0.1, 2, 16, "softmax", 0.3, 200, 4, 77)
    assert [len(r) for r in loaded.reducers_] == [2, 2]                    # 128 and 64 values > 16: PCA
    assert torch.equal(loaded.invariant_scores(probe_images), det.invariant_scores(probe_images))
    assert torch.equal(loaded.predict(probe_images), det.predict(probe_images))


def test_saved_file_holds_plain_values_and_float64_tensors(nic, tmp_path):
    p = tmp_path / "nic.pt"
    nic.save(p)
    state = torch.load(p, weights_only=True)                               # refuses any pickled object

    def leaves(v, path="state"):
        if isinstance(v, dict):
            assert all(isinstance(k, str) for k in v), path
            for k, x in v.items():
                yield from leaves(x, f"{path}[{k!r}]")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                yield from leaves(x, f"{path}[{i}]")
        else:
            yield path, v

    kinds = set()
    for path, v in leaves(state):
        assert v is None or isinstance(v, (str, int, float, torch.Tensor)), (path, type(v))
        if isinstance(v, torch.Tensor):
            assert v.dtype == torch.float64 and v.device.type == "cpu", path
        kinds.add(type(v).__name__)
    assert "Tensor" in kinds
    assert state["format"] == nic_mod.FORMAT == "robustops.detect.NICDetector/1"
    assert state["config"]["layers"] == ["conv1", "conv2", "fc1", "fc2"]
    assert state["layer_sizes"] == nic.layer_sizes_ and len(state["loc"]) == 7
    # the first two layers are wider than max_dims (PCA), fc2 (10 logits) is not
    assert state["reducers"][0]["pca_components"].shape[1] == 64 and state["reducers"][3]["pca_components"] is None
    sv = state["value_svms"][0]
    np.testing.assert_array_equal(sv["support_vectors"].numpy(), nic.sklearn_svms_[0].support_vectors_)
    np.testing.assert_array_equal(sv["dual_coef"].numpy(), nic.sklearn_svms_[0].dual_coef_[0])


def test_load_refuses_files_of_another_kind(nic, digits_cnn_trained, tmp_path):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    before = checksum(model)
    fs = FeatureSqueezingDetector(model).fit(xtr[:50])
    fs.save(tmp_path / "fs.pt")
    torch.save({"format": relevant_mod.FORMAT, "config": {}}, tmp_path / "rnd.pt")
    torch.save({"a": 1, "b": torch.zeros(3)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(4), tmp_path / "tensor.pt")
    for name in ("fs.pt", "rnd.pt", "dict.pt", "tensor.pt"):
        with pytest.raises(ValueError, match="is not a saved NICDetector"):
            NICDetector.load(tmp_path / name, model)
    # a saved RelevantNeuronDetector / FS detector does not load a NIC file either
    nic.save(tmp_path / "nic.pt")
    with pytest.raises(ValueError, match="not a saved FeatureSqueezingDetector"):
        FeatureSqueezingDetector.load(tmp_path / "nic.pt", model)

    # an object whose unpickling would run code is refused, not executed
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": nic_mod.FORMAT, "x": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        NICDetector.load(tmp_path / "evil.pt", model)
    assert checksum(model) == before


def test_load_refuses_malformed_files(nic, digits_cnn_trained, tmp_path):
    model = digits_cnn_trained[0]
    nic.save(tmp_path / "nic.pt")
    good = torch.load(tmp_path / "nic.pt", weights_only=True)

    def broken(edit, match):
        state = copy.deepcopy(good)
        edit(state)
        torch.save(state, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=match):
            NICDetector.load(tmp_path / "bad.pt", model)

    broken(lambda s: s.pop("loc"), "malformed.*KeyError.*loc")
    broken(lambda s: s["value_svms"].pop(), "expected 4 reducers")
    broken(lambda s: s["value_svms"][1].update(support_vectors=torch.zeros(5, 63, dtype=torch.float64)),
           r"value_svms\[1\].support_vectors has shape \(5, 63\)")
    broken(lambda s: s["provenance_svms"][0].update(dual_coef=torch.zeros(2, dtype=torch.float64)),
           r"provenance_svms\[0\].dual_coef has shape")
    broken(lambda s: s["probes"][2].update(weight=s["probes"][2]["weight"].float()), "float64")
    broken(lambda s: s["scale"].__setitem__(0, float("nan")), "non-finite")
    broken(lambda s: s["value_svms"][0].update(gamma=-1.0), "gamma must be a finite positive number")
    broken(lambda s: s.update(threshold="high"), "threshold must be a finite number")
    broken(lambda s: s["reducers"][0].update(pca_mean=None), "half of a PCA")
    broken(lambda s: s["config"].update(nu=2.0), "nu must be")


def test_load_refuses_a_model_that_does_not_match(nic, tmp_path):
    p = tmp_path / "nic.pt"
    nic.save(p)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"give \[.*\] values and 10 classes, the saved detector"):
        NICDetector.load(p, models.small_cnn(channels=(8, 32)))            # same layer names, other widths
    with pytest.raises(ValueError, match=r"64, 7\] values and 7 classes"):
        NICDetector.load(p, models.small_cnn(num_classes=7))
    with pytest.raises(ValueError, match="no submodule named 'conv1'"):
        NICDetector.load(p, nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    rgb = models.small_cnn(in_channels=3)
    before = checksum(rgb)
    with pytest.raises(ValueError, match=r"cannot run on the saved image shape \(1, 8, 8\)"):
        NICDetector.load(p, rgb)
    assert checksum(rgb) == before


def test_save_before_fit_raises(digits_cnn_trained, tmp_path):
    det = NICDetector(digits_cnn_trained[0])
    with pytest.raises(NotFittedError, match=r"NICDetector.save\(\) called before fit"):
        det.save(tmp_path / "nic.pt")
    assert not (tmp_path / "nic.pt").exists()
