"""Feature Squeezing and NIC baselines (robustops.detect.squeeze / nic): squeezers against
scipy / numpy references, the clean-data squeezer selection, and NIC's invariants (each one must
score adversarial inputs as *less* typical than clean ones, the point of an invariant)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from robustops import data, models
from robustops.attacks import FGSM
from robustops.detect import NICDetector

sklearn = pytest.importorskip("sklearn")
from sklearn.metrics import roc_auc_score  # noqa: E402


@pytest.fixture(scope="module")
def fgsm_test(digits_cnn_trained):
    model, xtr, ytr, xte, yte = digits_cnn_trained
    adv = FGSM(model, eps=0.3)(xte, yte)
    with torch.no_grad():
        ok = model(adv).argmax(1) != model(xte).argmax(1)
    return adv[ok]


def test_nic_every_provenance_invariant_ranks_adversarial_as_atypical(digits_cnn_trained, fgsm_test):
    """Each provenance invariant (one-class SVM on adjacent layers' probe outputs) must give
    FGSM images lower decision values than clean test images (AUC > 0.5). With softmax
    probabilities as probe outputs (near one-hot on clean data) the RBF one-class SVM's decision
    value was inverted: AUC 0.02-0.5 on the README's experiment."""
    model, xtr, ytr, xte, yte = digits_cnn_trained
    nic = NICDetector(model, nu=0.1, seed=0).fit(xtr)
    sc, sa = nic.invariant_scores(xte).numpy(), nic.invariant_scores(fgsm_test).numpy()
    assert nic.invariant_names == ["value:conv1", "value:conv2", "value:fc1", "value:fc2", "provenance:conv1->conv2",
                                   "provenance:conv2->fc1", "provenance:fc1->fc2"]
    np.testing.assert_array_equal(nic.score(xte).numpy(), sc.max(1))
    y = np.r_[np.zeros(len(sc)), np.ones(len(sa))]
    n_vi = len(nic.vi_)
    aucs = [roc_auc_score(y, np.r_[sc[:, k], sa[:, k]]) for k in range(sc.shape[1])]
    assert all(a > 0.6 for a in aucs[n_vi:]), aucs
    # the old probe output (softmax probabilities) inverts some of them: the failure mode fixed
    old = NICDetector(model, nu=0.1, seed=0, probe_output="softmax").fit(xtr)
    sc, sa = old.invariant_scores(xte).numpy(), old.invariant_scores(fgsm_test).numpy()
    aucs_old = [roc_auc_score(y, np.r_[sc[:, k], sa[:, k]]) for k in range(n_vi, sc.shape[1])]
    assert min(aucs_old) < 0.5, aucs_old


# ----------------------------------------------------------------------------- Feature Squeezing
def test_median_filter_all_window_sizes_match_scipy():
    from scipy.ndimage import median_filter as sp_median

    from robustops.detect import median_filter
    g = torch.Generator().manual_seed(1)
    # quantised values force ties inside windows, the case where the chosen rank matters
    x = (torch.randint(0, 4, (2, 3, 11, 6), generator=g) / 3).double()
    for k in (2, 3, 4, 5):
        ref = sp_median(x.numpy(), size=(1, 1, k, k), mode="reflect")
        torch.testing.assert_close(median_filter(x, k), torch.from_numpy(ref), rtol=0, atol=0)


def test_bit_depth_matches_numpy_rint_every_depth_including_ties():
    from robustops.detect import bit_depth
    # exact ties (k + 0.5) / (2^b - 1): numpy's rint and torch.round both round half to even
    for b in range(1, 9):
        lv = 2 ** b - 1
        x = torch.cat([torch.linspace(0, 1, 257, dtype=torch.float64),
                       (torch.arange(lv, dtype=torch.float64) + 0.5) / lv])
        ref = np.rint(x.numpy() * lv) / lv
        torch.testing.assert_close(bit_depth(x, b), torch.from_numpy(ref), rtol=0, atol=0)
        assert len(torch.unique(bit_depth(x, b))) == lv + 1


def test_fs_threshold_is_the_clean_quantile_and_score_is_max_l1(digits_cnn_trained):
    from robustops.detect import FeatureSqueezingDetector, bit_depth, median_filter
    model, xtr, ytr, xte, yte = digits_cnn_trained
    fs = FeatureSqueezingDetector(model, ("bit_depth_3", "median_3x3"), fpr=0.05).fit(xtr[:400])
    with torch.no_grad():
        p = model(xtr[:400]).softmax(1).double().numpy()
        d = [np.abs(model(f(xtr[:400])).softmax(1).double().numpy() - p).sum(1)
             for f in (lambda x: bit_depth(x, 3), lambda x: median_filter(x, 3))]
    ref = np.maximum(*d)
    np.testing.assert_allclose(fs.clean_scores_.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert fs.threshold_ == pytest.approx(np.quantile(ref, 0.95), rel=1e-5, abs=1e-6)


def test_select_squeezers_rule_against_manual_agreement(digits_cnn_trained):
    from robustops.detect import bit_depth, median_filter, select_squeezers, squeezer_agreement
    model, xtr, ytr, xte, yte = digits_cnn_trained
    x = xtr[:500]
    with torch.no_grad():
        pred = model(x).argmax(1)
        manual = {f"bit_depth_{b}": int((model(bit_depth(x, b)).argmax(1) == pred).sum()) / len(x) for b in (1, 2, 3, 4, 5)}
        manual.update({f"median_{k}x{k}": int((model(median_filter(x, k)).argmax(1) == pred).sum()) / len(x)
                       for k in (2, 3)})
    agree = squeezer_agreement(model, x)
    assert agree.keys() == manual.keys()
    for k in manual:
        assert agree[k] == pytest.approx(manual[k], abs=1e-12)
    for thr in (0.5, 0.9, 0.97, 0.99, 1.0):
        bits = [b for b in (1, 2, 3, 4, 5) if manual[f"bit_depth_{b}"] >= thr]
        meds = [k for k in (2, 3) if manual[f"median_{k}x{k}"] >= thr]
        want = tuple([f"bit_depth_{min(bits)}"] if bits else []) + tuple([f"median_{max(meds)}x{max(meds)}"] if meds else [])
        if not want:
            with pytest.raises(ValueError, match="no squeezer keeps"):
                select_squeezers(model, x, min_agreement=thr)
        else:
            assert select_squeezers(model, x, min_agreement=thr) == want
    assert select_squeezers(model, x, min_agreement=1e-9) == ("bit_depth_1", "median_3x3")
    with pytest.raises(ValueError, match="min_agreement"):
        select_squeezers(model, x, min_agreement=0)
    with pytest.raises(ValueError, match="unknown squeezer"):
        select_squeezers(model, x, candidates=("blur",))


def test_fs_on_binary_images_undoes_fgsm_exactly():
    """The regime of the paper's MNIST result: on {0, 1} images any perturbation smaller than
    0.5 is removed exactly by 1-bit depth, so the squeezed FGSM image *is* the clean image, every
    clean score is 0 and every successful FGSM image scores its softmax jump (detected)."""
    from robustops.detect import FeatureSqueezingDetector, bit_depth, evaluate_detector
    xtr, ytr = data.as_tensors(data.load("digits", split="train"))
    xte, yte = data.as_tensors(data.load("digits", split="test"))
    xtr, xte = (xtr > 0.5).float(), (xte > 0.5).float()
    torch.manual_seed(0)
    model = models.small_cnn()
    models.train(model, (xtr, ytr), epochs=3, optimizer="adam", lr=3e-3, seed=0)
    model.eval()
    adv = FGSM(model, eps=0.3)(xte, yte)
    with torch.no_grad():
        ok = model(adv).argmax(1) != model(xte).argmax(1)
        jump = (model(adv[ok]).softmax(1) - model(xte[ok]).softmax(1)).abs().sum(1)
    assert int(ok.sum()) > 50
    torch.testing.assert_close(bit_depth(adv, 1), xte, rtol=0, atol=0)
    fs = FeatureSqueezingDetector(model, ("bit_depth_1",), fpr=0.05).fit(xtr)
    assert fs.threshold_ == 0.0 and float(fs.clean_scores_.abs().max()) == 0.0
    torch.testing.assert_close(fs.score(adv[ok]), jump, rtol=1e-5, atol=1e-6)
    res = evaluate_detector(fs, xte, adv[ok])
    assert res["tpr"] == 1.0 and res["fpr"] == 0.0
