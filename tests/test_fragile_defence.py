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


# ---------------------------------------------------------------------------------------------
# every public entry point goes through the shared checks (issues 9.8, 14.1, 14.3, 14.4)
# ---------------------------------------------------------------------------------------------
import robustops
from robustops.fragile import (SplitIndexError, kernel_dropout_naive, taylor_importance, variant_logits,
                               fgsm_accuracy)


class _TupleNet(torch.nn.Module):
    """The issue's model: forward returns (logits, probabilities)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        logits = self.head(torch.relu(self.conv(x)).flatten(1))
        return logits, logits.softmax(1)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [p.grad for p in model.parameters()])


def _unchanged(model, snap):
    state, modes, req, grads = snap
    return (all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
            and [m.training for m in model.modules()] == modes
            and [p.requires_grad for p in model.parameters()] == req
            and all(a is b for a, b in zip([p.grad for p in model.parameters()], grads)))


_TUPLE_CALLS = {
    "kernel_dropout": lambda m, x, y, L="conv": kernel_dropout(m, L, (x, y)),
    "kernel_dropout_adversarial": lambda m, x, y, L="conv": kernel_dropout(m, L, (x, y), adversarial=0.1),
    "kernel_dropout_naive": lambda m, x, y, L="conv": kernel_dropout_naive(m, L, (x, y)),
    "variant_logits": lambda m, x, y, L="conv": variant_logits(m, L, x),
    "taylor_importance": lambda m, x, y, L="conv": taylor_importance(m, L, (x, y)),
    "adversarial_targeting": lambda m, x, y, L="conv": adversarial_targeting(m, L, (x, y), [0.1], ([0, 1], [2, 3])),
    "fgsm_accuracy": lambda m, x, y, L="conv": fgsm_accuracy(m, x, y, [0.1]),
    "search_noise_level": lambda m, x, y, L="conv": search_noise_level(m, L, ([0], [1, 2, 3]), (x, y), candidates=[0.1]),
    "apply_filter": lambda m, x, y, L="conv": apply_filter(m, L, (x, y), split=([0], [1, 2, 3]), eps_noise=0.1),
}


@pytest.mark.parametrize("call", sorted(_TUPLE_CALLS))
def test_tuple_output_is_refused_consistently(call):
    torch.manual_seed(0)
    net = _TupleNet()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    snap = _snapshot(net)
    with pytest.raises(ValueError, match="SelectOutput"):
        _TUPLE_CALLS[call](net, x, y)
    assert _unchanged(net, snap)
    # wrapped as the message says, the same call runs and equals the plain logits model's result
    _TUPLE_CALLS[call](robustops.SelectOutput(net, 0), x, y, "model.conv")


def test_select_output_wrapper_equals_plain_logits(setup):
    model, x, y = setup
    a = kernel_dropout(model, "conv1", (x, y), adversarial=0.05)

    class Pair(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            out = self.inner(z)
            return out, out.softmax(1)

    b = kernel_dropout(robustops.SelectOutput(Pair(model), 0), "model.inner.conv1", (x, y), adversarial=0.05)
    assert torch.equal(a.clean_accuracy, b.clean_accuracy) and torch.equal(a.adversarial_accuracy,
                                                                            b.adversarial_accuracy)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_integer_label_dtypes(setup, dtype):
    model, x, y = setup
    yd = y.to(dtype)
    S, Sn = [0, 3, 5], [i for i in range(32) if i not in (0, 3, 5)]
    ref = kernel_dropout(model, "conv1", (x, y), adversarial=0.05)
    got = kernel_dropout(model, "conv1", (x, yd), adversarial=0.05)
    assert torch.equal(got.clean_accuracy, ref.clean_accuracy)
    assert torch.equal(got.adversarial_accuracy, ref.adversarial_accuracy)
    assert torch.equal(kernel_dropout_naive(model, "conv1", (x[:10], yd[:10]))[0],
                       kernel_dropout_naive(model, "conv1", (x[:10], y[:10]))[0])
    torch.testing.assert_close(taylor_importance(model, "conv1", (x, yd)), taylor_importance(model, "conv1", (x, y)))
    assert torch.equal(adversarial_targeting(model, "conv1", (x, yd), [0.05], (S, Sn)).counts,
                       adversarial_targeting(model, "conv1", (x, y), [0.05], (S, Sn)).counts)
    assert torch.equal(fgsm_accuracy(model, x, yd, [0.0, 0.1]), fgsm_accuracy(model, x, y, [0.0, 0.1]))


_LABEL_CALLS = {
    "kernel_dropout": lambda m, x, y: kernel_dropout(m, "conv1", (x, y)),
    "kernel_dropout_naive": lambda m, x, y: kernel_dropout_naive(m, "conv1", (x, y)),
    "taylor_importance": lambda m, x, y: taylor_importance(m, "conv1", (x, y)),
    "adversarial_targeting": lambda m, x, y: adversarial_targeting(m, "conv1", (x, y), [0.1], ([0], [1, 2])),
    "fgsm_accuracy": lambda m, x, y: fgsm_accuracy(m, x, y, [0.1]),
    "apply_filter": lambda m, x, y: apply_filter(m, "conv1", (x, y), split=([0], [1, 2]), eps_noise=0.1),
}


@pytest.mark.parametrize("call", sorted(_LABEL_CALLS))
def test_bad_labels_and_images_are_named(setup, call):
    model, x, y = setup
    x, y = x[:8], y[:8]
    fn = _LABEL_CALLS[call]
    snap = _snapshot(model)
    with pytest.raises(TypeError, match="integer"):
        fn(model, x, y.float())
    with pytest.raises(TypeError, match="integer"):
        fn(model, x, y > 4)
    bad = y.clone()
    bad[3] = 10
    with pytest.raises(ValueError, match="class 10"):
        fn(model, x, bad)
    with pytest.raises(ValueError, match=">= 0"):
        fn(model, x, y - 20)
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(model, xn, y)
    with pytest.raises(ValueError, match=r"\[lo, hi\]"):
        fn(model, x * 3, y)
    with pytest.raises(TypeError):
        fn(model, x.tolist(), y)  # list input
    assert _unchanged(model, snap)


def test_empty_inputs_named(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="empty"):
        variant_logits(model, "conv1", x[:0])  # was ZeroDivisionError
    for fn in (lambda: kernel_dropout(model, "conv1", (x[:0], y[:0])),
               lambda: taylor_importance(model, "conv1", (x[:0], y[:0])),
               lambda: adversarial_targeting(model, "conv1", (x[:0], y[:0]), [0.1], ([0], [1])),
               lambda: kernel_dropout_naive(model, "conv1", (x[:0], y[:0]))):
        with pytest.raises(ValueError, match="empty|no examples"):
            fn()


@pytest.mark.parametrize("split, match", [
    (([-1], [0, 1]), "negative"),          # used to wrap to the last kernel
    (([0, 1], [1, 2]), "both S and S'"),
    (([0, 0], [1, 2]), "more than once"),
    (([0], [1, 32]), r"\[0, 32\)"),
    ((torch.tensor([0.0]), [1, 2]), "integer"),
])
def test_split_indices_checked(setup, split, match):
    model, x, y = setup
    snap = _snapshot(model)
    with pytest.raises(SplitIndexError, match=match):
        apply_filter(model, "conv1", (x, y), split=split, eps_noise=0.1)
    with pytest.raises(SplitIndexError, match=match):
        adversarial_targeting(model, "conv1", (x, y), [0.1], split)
    with pytest.raises(SplitIndexError, match=match):
        filter_layer_weights(model.conv1.weight, split, 0.1)
    assert _unchanged(model, snap)


def test_svd_filter_refuses_non_finite_weights():
    K = torch.randn(4, 9)
    K[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        svd_filter(K, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        svd_threshold(K)
    w = torch.randn(6, 1, 3, 3)
    w[2, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        filter_layer_weights(w, ([0], [1, 2, 3]), 0.1)


def test_gradient_apis_under_inference_mode(setup):
    model, x, y = setup
    S, Sn = [0, 3, 5], [i for i in range(32) if i not in (0, 3, 5)]
    calls = {
        "kernel_dropout": lambda: kernel_dropout(model, "conv1", (x, y), adversarial=0.05, taylor=True),
        "taylor": lambda: taylor_importance(model, "conv1", (x, y), per_example=True),
        "targeting": lambda: adversarial_targeting(model, "conv1", (x, y), [0.02, 0.1], (S, Sn)),
        "fgsm_accuracy": lambda: fgsm_accuracy(model, x, y, [0.0, 0.05, 0.1]),
        "search": lambda: search_noise_level(model, "conv1", (S, Sn), (x, y), candidates=[0.05, 0.2]),
        "apply_filter": lambda: apply_filter(model, "conv1", (x, y), split=(S, Sn), eps_noise=0.05,
                                             targeting_eps=[0.05]),
    }
    snap = _snapshot(model)
    for name, fn in calls.items():
        plain = fn()
        with torch.inference_mode():
            inside = fn()
        if name == "kernel_dropout":
            assert torch.equal(plain.adversarial_accuracy, inside.adversarial_accuracy)
            torch.testing.assert_close(plain.taylor, inside.taylor)
        elif name == "targeting":
            assert torch.equal(plain.counts, inside.counts)
        elif name == "search":
            assert plain.table == inside.table
        elif name == "apply_filter":
            assert plain[1].adversarial_accuracy_after == inside[1].adversarial_accuracy_after
            assert torch.equal(plain[1].targeting_after.counts, inside[1].targeting_after.counts)
            # the filtered copy made under inference mode is a normal, differentiable model
            fgsm_accuracy(inside[0], x, y, [0.1])
        else:
            assert torch.equal(plain, inside) if isinstance(plain, torch.Tensor) else plain == inside
        assert _unchanged(model, snap), name
    # inputs created under inference mode work as well
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    assert torch.equal(fgsm_accuracy(model, xi, yi, [0.1]), fgsm_accuracy(model, x, y, [0.1]))


# ---------------------------------------------------------------------------------------------
# the statistical median (issue 17.3)
# ---------------------------------------------------------------------------------------------
def test_unknown_noise_threshold_uses_true_median():
    torch.manual_seed(0)
    K = torch.randn(20, 27, dtype=torch.float64)  # 20 singular values: an even count
    sigma = torch.linalg.svdvals(K).numpy()
    tau, beta = svd_threshold(K)
    assert tau == pytest.approx(gavish_donoho_omega(20 / 27) * float(np.median(sigma)), rel=1e-12)
    lower = gavish_donoho_omega(20 / 27) * float(np.sort(sigma)[9])  # what torch.median gives
    assert tau > lower * 1.001
    Kt, info = svd_filter(K, mode="hard")
    assert info.tau == pytest.approx(tau) and info.rank_kept == int((sigma > tau).sum())


def test_median_split_rule_is_true_median():
    s = torch.tensor([0.1, 0.4, 0.6, 0.9])
    sp = fragile_split(s, rule="median")
    assert sp.threshold == pytest.approx(float(np.median(s.numpy())))  # 0.5, not 0.4
    assert sp.fragile.tolist() == [0, 1] and sp.null.tolist() == [2, 3]


# ---------------------------------------------------------------------------------------------
# bounds are parameters (issue 17.4)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def normalised_setup(setup):
    """The same classifier fed [-1, 1] inputs: model(x) = net((x + 1) / 2)."""
    net, x01, y = setup

    class Rescale(torch.nn.Module):
        def forward(self, z):
            return (z + 1) / 2

    model = torch.nn.Sequential(Rescale(), net)
    return model, x01 * 2 - 1, y


def _fgsm_reference(model, x, y, eps, lo, hi):
    xg = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model.eval()(xg), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, xg)
    return torch.clamp(x + eps * g.sign(), lo, hi)


def test_fgsm_accuracy_with_normalised_bounds(normalised_setup):
    model, x, y = normalised_setup
    eps = [0.0, 0.1, 0.4]
    got = fgsm_accuracy(model, x, y, eps, lo=-1, hi=1)
    for k, e in enumerate(eps):
        xa = _fgsm_reference(model, x, y, e, -1.0, 1.0)
        with torch.no_grad():
            acc = (model(xa).argmax(1) == y).double().mean()
        assert got[k].item() == pytest.approx(acc.item())
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double().mean().item()
    assert got[0].item() == pytest.approx(clean)   # eps 0 is the clean accuracy (no clamp to [0, 1])
    with pytest.raises(ValueError, match=r"\[lo, hi\]"):
        fgsm_accuracy(model, x, y, eps)             # default [0, 1] refuses [-1, 1] inputs


def test_kernel_dropout_adversarial_with_bounds(normalised_setup):
    model, x, y = normalised_setup
    res = kernel_dropout(model, "1.conv1", (x, y), adversarial=0.1, lo=-1, hi=1, batch_size=64)
    x_adv = _fgsm_reference(model, x, y, 0.1, -1.0, 1.0)
    ref = kernel_dropout(model, "1.conv1", (x, y), adversarial=x_adv, lo=-1, hi=1, batch_size=64)
    assert torch.equal(res.adversarial_accuracy, ref.adversarial_accuracy)
    assert x_adv.min() < 0  # the [0, 1] clamp would have moved these


def test_targeting_and_filter_with_bounds(normalised_setup):
    model, x, y = normalised_setup
    S, Sn = [0, 3, 5, 9], [i for i in range(32) if i not in (0, 3, 5, 9)]
    r = adversarial_targeting(model, "1.conv1", (x, y), [0.2], (S, Sn), lo=-1, hi=1)
    xa = _fgsm_reference(model, x, y, 0.2, -1.0, 1.0)
    with torch.no_grad():
        conv = model[1].conv1
        d = (conv((xa + 1) / 2) - conv((x + 1) / 2)).flatten(2).norm(dim=-1)
    assert int(r.counts[0]) == int((d[:, S].mean(1) > d[:, Sn].mean(1)).sum())
    _, rep = apply_filter(model, "1.conv1", (x, y), split=(S, Sn), eps_noise=0.05, lo=-1, hi=1)
    assert rep.fgsm_eps == pytest.approx(0.2)  # default 0.1 of the range hi - lo
    expect = fgsm_accuracy(model, x, y, [0.2], lo=-1, hi=1)[0].item()
    assert rep.adversarial_accuracy_before == pytest.approx(expect)
    search = search_noise_level(model, "1.conv1", (S, Sn), (x, y), candidates=[0.05], lo=-1, hi=1)
    assert search.baseline_adversarial_accuracy == pytest.approx(expect)
