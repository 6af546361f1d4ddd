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
def digits():
    torch.manual_seed(0)
    xtr, ytr = data.as_tensors(data.load("digits", split="train"))
    xte, yte = data.as_tensors(data.load("digits", split="test"))
    model = models.small_cnn()
    models.train(model, (xtr, ytr), epochs=6, optimizer="adam", lr=3e-3, seed=0)
    model.eval()
    return model, xtr, ytr, xte, yte


@pytest.fixture(scope="module")
def fgsm_test(digits):
    model, xtr, ytr, xte, yte = digits
    adv = FGSM(model, eps=0.3)(xte, yte)
    with torch.no_grad():
        ok = model(adv).argmax(1) != model(xte).argmax(1)
    return adv[ok]


def _invariant_decisions(nic, x):
    acts, _ = nic._activations(x)
    return nic._decisions([nic._apply(s, a) for s, a in zip(nic.reducers_, acts)])


def test_nic_every_provenance_invariant_ranks_adversarial_as_atypical(digits, fgsm_test):
    """Each provenance invariant (one-class SVM on adjacent layers' probe outputs) must give
    FGSM images lower decision values than clean test images (AUC > 0.5). With softmax
    probabilities as probe outputs (near one-hot on clean data) the RBF one-class SVM's decision
    value was inverted: AUC 0.02-0.5 on the README's experiment."""
    model, xtr, ytr, xte, yte = digits
    nic = NICDetector(model, nu=0.1, seed=0).fit(xtr)
    dc, da = _invariant_decisions(nic, xte), _invariant_decisions(nic, fgsm_test)
    y = np.r_[np.zeros(len(dc)), np.ones(len(da))]
    n_vi = len(nic.vi_)
    aucs = [roc_auc_score(y, -np.r_[dc[:, k], da[:, k]]) for k in range(dc.shape[1])]
    assert all(a > 0.6 for a in aucs[n_vi:]), aucs
    # the old probe output (softmax probabilities) inverts some of them: the failure mode fixed
    old = NICDetector(model, nu=0.1, seed=0, probe_output="softmax").fit(xtr)
    dc, da = _invariant_decisions(old, xte), _invariant_decisions(old, fgsm_test)
    aucs_old = [roc_auc_score(y, -np.r_[dc[:, k], da[:, k]]) for k in range(n_vi, dc.shape[1])]
    assert min(aucs_old) < 0.5, aucs_old
