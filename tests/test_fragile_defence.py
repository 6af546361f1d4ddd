"""Fragile/null split, Algorithm 1 (adversarial targeting), SVD filter math and apply_filter."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustops.fragile import (EmptySplitError, NoiseLevelError, amplification_factor, adversarial_targeting,
                               apply_filter, filter_layer_weights, fragile_split, gavish_donoho_lambda,
                               gavish_donoho_omega, kernel_dropout, search_noise_level, svd_filter, svd_threshold)
from robustops.models import papernot_mnist


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small problems: one intra-op thread is faster and avoids OpenMP oversubscription on
    shared CI machines. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = papernot_mnist(input_size=20)
    x = torch.rand(40, 1, 20, 20)
    with torch.no_grad():
        model.fc3.bias -= model.eval()(x).mean(0)  # input-dependent predictions (see test_fragile_dropout)
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 3) % 10
    return model, x, y


# --- split -------------------------------------------------------------------------------------
def test_split_rules():
    s = torch.tensor([0.9, 0.5, 0.8, 0.7, 0.95])
    sp = fragile_split(s)
    assert sp.threshold == pytest.approx(0.77)
    assert sp.fragile.tolist() == [1, 3] and sp.null.tolist() == [0, 2, 4]
    assert fragile_split(s, rule="median").fragile.tolist() == [1, 3]
    assert fragile_split(s, rule="value", threshold=0.85).fragile.tolist() == [1, 2, 3]
    assert fragile_split(s, rule="quantile", threshold=0.2).fragile.tolist() == [1]
    k1 = fragile_split(s, rule="std", threshold=1.0)
    assert k1.threshold == pytest.approx(s.double().mean().item() - s.double().std(unbiased=False).item())
    assert fragile_split(s, rule="mean", threshold=0.2).fragile.numel() == 5
    with pytest.raises(ValueError):
        fragile_split(s, rule="bogus")
    with pytest.raises(ValueError):
        fragile_split(s, rule="value")


def test_split_from_result(setup):
    model, x, y = setup
    res = kernel_dropout(model, "conv1", (x, y))
    sp = fragile_split(res)
    assert sorted(sp.fragile.tolist() + sp.null.tolist()) == list(range(32))
    assert (res.clean_accuracy[sp.fragile] < res.clean_accuracy.mean()).all()
    lo = fragile_split(res, metric="clean_loss")  # higher loss = more fragile
    assert (res.clean_loss[lo.fragile] > res.clean_loss.mean()).all()


# --- Algorithm 1 --------------------------------------------------------------------------------
def test_targeting_matches_direct_computation(setup):
    model, x, y = setup
    S, Sn = [0, 3, 5, 9, 30], [i for i in range(32) if i not in (0, 3, 5, 9, 30)]
    eps = [0.01, 0.05, 0.2]
    r = adversarial_targeting(model, "conv1", (x, y), eps, (S, Sn), batch_size=16)
    # direct: one gradient, FGSM per eps, conv1 outputs, per-kernel L2 distance, mean over S vs S'
    m = model.eval()
    xg = x.clone().requires_grad_(True)
    loss = F.cross_entropy(m(xg), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xg)
    for k, e in enumerate(eps):
        xa = torch.clamp(x + e * g.sign(), 0, 1)
        with torch.no_grad():
            d = (m.conv1(xa) - m.conv1(x)).flatten(2).norm(dim=-1)
        count = int((d[:, S].mean(1) > d[:, Sn].mean(1)).sum())
        assert int(r.counts[k]) == count
        assert r.percentage[k].item() == pytest.approx(100 * count / 40)
    assert r.num_examples == 40
    with pytest.raises(EmptySplitError):
        adversarial_targeting(model, "conv1", (x, y), eps, ([], list(range(32))))


# --- SVD filter ---------------------------------------------------------------------------------
def test_gavish_donoho_constants():
    assert gavish_donoho_lambda(1.0) == pytest.approx(4 / math.sqrt(3))
    # beta -> 0: lambda -> sqrt(2)
    assert gavish_donoho_lambda(1e-9) == pytest.approx(math.sqrt(2), rel=1e-6)
    b = 0.5
    expect = math.sqrt(2 * 1.5 + 8 * b / (1.5 + math.sqrt(b * b + 14 * b + 1)))
    assert gavish_donoho_lambda(b) == pytest.approx(expect)
    assert gavish_donoho_omega(1.0) == pytest.approx(0.56 - 0.95 + 1.82 + 1.43)
    with pytest.raises(ValueError):
        gavish_donoho_lambda(1.5)


def test_svd_filter_modes():
    torch.manual_seed(1)
    K = torch.randn(6, 27, dtype=torch.float64)
    sigma = torch.linalg.svdvals(K)
    # tau = 0 with hard thresholding keeps everything: exact reconstruction
    Kt, info = svd_filter(K, mode="hard", tau=0.0)
    torch.testing.assert_close(Kt, K, rtol=1e-12, atol=1e-12)
    # clamping at a tau above every singular value changes nothing either
    Kt, _ = svd_filter(K, mode="clamp", tau=float(sigma.max()) + 1)
    torch.testing.assert_close(Kt, K, rtol=1e-12, atol=1e-12)
    tau = float(sigma[2])
    Kc, ic = svd_filter(K, mode="clamp", tau=tau)
    torch.testing.assert_close(torch.linalg.svdvals(Kc), torch.clamp(sigma, max=tau))
    Kh, ih = svd_filter(K, mode="hard", tau=float(sigma[1] + sigma[2]) / 2)
    assert ih.rank_kept == 2
    torch.testing.assert_close(torch.linalg.svdvals(Kh)[:2], sigma[:2])
    # eps_noise gives tau = lambda(beta) sqrt(n) eps with beta = m/n, m <= n
    tau2, beta = svd_threshold(K, 0.1)
    assert beta == pytest.approx(6 / 27)
    assert tau2 == pytest.approx(gavish_donoho_lambda(6 / 27) * math.sqrt(27) * 0.1)
    assert svd_threshold(K.T, 0.1) == (tau2, beta)  # orientation does not matter
    tau3, _ = svd_threshold(K)  # unknown noise: the statistical median (6 values: mean of the middle two)
    assert tau3 == pytest.approx(gavish_donoho_omega(6 / 27) * float(np.median(sigma.numpy())), rel=1e-12)
    # amplification factor = 1 + spectral norm of the change
    assert amplification_factor(K, Kc) == pytest.approx(1 + float(sigma[0] - tau))
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(NoiseLevelError):
            svd_filter(K, bad)


def test_filter_layer_weights():
    torch.manual_seed(2)
    w = torch.randn(8, 2, 3, 3)
    S, Sn = [1, 4], [0, 2, 3, 5, 6, 7]
    new, alpha, info = filter_layer_weights(w, (S, Sn), 0.05, mode="clamp")
    K = w[Sn].reshape(6, -1)
    Kt, _ = svd_filter(K, 0.05, mode="clamp")
    torch.testing.assert_close(new[Sn].reshape(6, -1), Kt)
    assert alpha == pytest.approx(amplification_factor(K, Kt), rel=1e-5)
    torch.testing.assert_close(new[S], w[S] * alpha)
    new2, alpha2, _ = filter_layer_weights(w, (S, Sn), 0.05, alpha=1.5)
    assert alpha2 == 1.5
    torch.testing.assert_close(new2[S], w[S] * 1.5)


def test_apply_filter_leaves_model_untouched(setup):
    model, x, y = setup
    model = copy.deepcopy(model)
    model.train()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    new, rep = apply_filter(model, "conv1", (x, y), eps_noise=0.05, targeting_eps=[0.05, 0.1], fgsm_eps=0.1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert new is not model
    assert not torch.equal(new.conv1.weight, model.conv1.weight)
    assert sorted(rep.fragile.tolist() + rep.null.tolist()) == list(range(32))
    assert rep.alpha >= 1.0 and rep.tau > 0
    assert 0 <= rep.clean_accuracy_after <= 1 and rep.targeting_after.percentage.shape == (2,)
    # search variant: chooses among the candidates with the clean-accuracy margin
    new2, rep2 = apply_filter(model, "conv1", (x, y), eps_noise="search", held_out=(x[:20], y[:20]),
                              candidates=[0.01, 0.05, 0.2], fgsm_eps=0.05)
    assert rep2.search is not None and rep2.eps_noise in (0.01, 0.05, 0.2)
    assert len(rep2.search.table) == 3
    _, rep3 = apply_filter(model, "conv1", (x, y), eps_noise="unknown", mode="hard")
    assert rep3.eps_noise is None
    with pytest.raises(NoiseLevelError):
        apply_filter(model, "conv1", (x, y), eps_noise=0.0)
    with pytest.raises(NoiseLevelError):
        apply_filter(model, "conv1", (x, y), eps_noise="loud")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


def test_search_noise_level_rule(setup):
    model, x, y = setup
    r = search_noise_level(model, "conv1", ([0, 1], list(range(2, 32))), (x, y), candidates=[1e-4, 1.0],
                           clean_margin=0.0)
    for row in r.table:
        if row["eps_noise"] == r.eps_noise:
            assert row["adversarial_accuracy"] == r.adversarial_accuracy
    ok = [row for row in r.table if row["clean_accuracy"] >= r.baseline_clean_accuracy]
    if ok:
        assert r.adversarial_accuracy == max(row["adversarial_accuracy"] for row in ok)


def test_plots_write_pngs(setup, tmp_path):
    pytest.importorskip("matplotlib")
    from robustops.fragile.plots import plot_kernel_performance, plot_targeting

    model, x, y = setup
    res = kernel_dropout(model, "conv1", (x, y))
    p1 = plot_kernel_performance(res, tmp_path / "fig1.png")
    split = fragile_split(res)
    t = adversarial_targeting(model, "conv1", (x, y), [0.01, 0.1], split)
    p2 = plot_targeting({"original": t}, tmp_path / "fig2.png")
    for p in (p1, p2):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
