"""robustops.attacks on a small CNN trained on sklearn digits (trained once per module, ~1 s)."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robustops import attacks, data, models
from robustops.attacks import (BIM, CWL2, FGSM, JSMA, PGD, PGDL2, DeepFool, OnePixel, cw_l2, deepfool, fgsm,
                               jsma, one_pixel, pgd, pgd_l2, robust_accuracy_curve, substitute_attack)

torch.set_num_threads(1)
N_TEST = 200


@pytest.fixture(scope="module")
def setup():
    x_tr, y_tr = data.as_tensors(data.load("digits", split="train"))
    x_te, y_te = data.as_tensors(data.load("digits", split="test"))
    torch.manual_seed(0)
    model = models.small_cnn()
    models.train(model, (x_tr, y_tr), epochs=5, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    return model, x_te[:N_TEST], y_te[:N_TEST], x_tr


def accuracy(model, x, y):
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    model.train(was)
    return acc


class Snapshot:
    """Parameters (values, .grad object, requires_grad) and train flags, to prove nothing changed."""

    def __init__(self, model):
        self.model = model
        model.train()
        model.fc2.weight.grad = torch.ones_like(model.fc2.weight)
        self.values = [p.detach().clone() for p in model.parameters()]
        self.grads = [p.grad for p in model.parameters()]
        self.requires = [p.requires_grad for p in model.parameters()]
        self.modes = [m.training for m in model.modules()]

    def check(self):
        params = list(self.model.parameters())
        assert all(torch.equal(p, v) for p, v in zip(params, self.values))
        assert all(p.grad is g for p, g in zip(params, self.grads))
        assert [p.requires_grad for p in params] == self.requires
        assert [m.training for m in self.model.modules()] == self.modes
        self.model.fc2.weight.grad = None


def within(x_adv, x, eps=None, l2=None, lo=0.0, hi=1.0):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= lo and float(x_adv.max()) <= hi
    d = (x_adv - x).flatten(1)
    if eps is not None:
        assert float(d.abs().max()) <= eps + 1e-6
    if l2 is not None:
        assert float(d.norm(dim=1).max()) <= l2 + 1e-5


def other_targets(model, x):
    with torch.no_grad():
        return (model.eval()(x).argmax(1) + 1) % 10


# ---------------------------------------------------------------------------------------------
# FGSM and the curve
# ---------------------------------------------------------------------------------------------
def test_fgsm_untargeted_and_targeted(setup, device):
    model, x, y, _ = setup
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    snap = Snapshot(model)
    clean = accuracy(model, x, y)
    x_adv = fgsm(model, x, y, 0.2)
    snap.check()
    assert x_adv.device == x.device
    within(x_adv, x, eps=0.2)
    assert accuracy(model, x_adv, y) < clean - 0.2
    assert torch.equal(FGSM(model, 0.2)(x, y), x_adv)
    t = other_targets(model, x)
    snap = Snapshot(model)
    x_t = fgsm(model, x, t, 0.2, targeted=True)
    snap.check()
    hit = (model.eval()(x_t).argmax(1) == t).double().mean().item()
    assert hit > 0.15  # single step: a weak targeted attack, but far above chance for the shifted class
    # y=None: the model's predictions
    pred = model(x).argmax(1)
    assert torch.equal(fgsm(model, x, None, 0.1), fgsm(model, x, pred, 0.1))
    model.cpu()


def test_fgsm_per_sample_eps(setup):
    model, x, y, _ = setup
    eps = torch.linspace(0, 0.3, x.shape[0])
    x_adv = fgsm(model, x, y, eps)
    d = (x_adv - x).flatten(1).abs().amax(1)
    assert torch.all(d <= eps + 1e-6)
    assert torch.equal(x_adv[0], x[0])
    # one sample's row equals the scalar attack with that eps
    i = 57
    torch.testing.assert_close(x_adv[i:i + 1], fgsm(model, x[i:i + 1], y[i:i + 1], float(eps[i])), rtol=0, atol=1e-6)


def test_curve_equals_per_eps_fgsm(setup):
    model, x, y, _ = setup
    eps = [0.0, 0.05, 0.1, 0.2, 0.3]
    snap = Snapshot(model)
    curve = robust_accuracy_curve(model, (x, y), eps, batch_size=64)
    snap.check()
    assert curve.shape == (5,) and curve.dtype == torch.float64
    expected = []
    for e in eps:
        correct = 0
        for s in range(0, x.shape[0], 64):
            xb, yb = x[s:s + 64], y[s:s + 64]
            correct += int((model.eval()(fgsm(model, xb, yb, e)).argmax(1) == yb).sum())
        expected.append(correct / x.shape[0])
    assert curve.tolist() == expected
    assert curve[0].item() == accuracy(model, x, y)
    assert all(a >= b for a, b in zip(curve.tolist(), curve.tolist()[1:]))
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    assert torch.equal(robust_accuracy_curve(model, loader, torch.tensor(eps)), curve)
    # the exact per-eps forwards and chunked concatenated forwards give the same numbers here
    assert torch.equal(robust_accuracy_curve(model, loader, eps, concat_forward=False), curve)
    assert torch.equal(robust_accuracy_curve(model, (x, y), eps, concat_forward=True, forward_batch=100), curve)


# ---------------------------------------------------------------------------------------------
# BIM / PGD
# ---------------------------------------------------------------------------------------------
def test_pgd_linf(setup, device):
    model, x, y, _ = setup
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    snap = Snapshot(model)
    x_adv = pgd(model, x, y, eps=0.2, alpha=0.04, steps=10, seed=0)
    snap.check()
    within(x_adv, x, eps=0.2)
    acc_pgd = accuracy(model, x_adv, y)
    assert acc_pgd < accuracy(model, fgsm(model, x, y, 0.2), y) + 1e-9
    assert acc_pgd < 0.5 * accuracy(model, x, y)
    assert torch.equal(x_adv, PGD(model, 0.2, 0.04, 10, seed=0)(x, y))  # seeded: reproducible
    assert not torch.equal(x_adv, PGD(model, 0.2, 0.04, 10, seed=1)(x, y))
    t = other_targets(model, x)
    x_t = pgd(model, x, t, eps=0.3, alpha=0.05, steps=20, targeted=True, seed=0)
    within(x_t, x, eps=0.3)
    assert (model.eval()(x_t).argmax(1) == t).double().mean().item() > 0.8
    model.cpu()


def test_bim_pgd_l2_and_per_sample(setup):
    model, x, y, _ = setup
    clean = accuracy(model, x, y)
    x_b = BIM(model, eps=0.2, alpha=0.04, steps=10)(x, y)
    within(x_b, x, eps=0.2)
    assert accuracy(model, x_b, y) < 0.5 * clean
    x_2 = pgd_l2(model, x, y, eps=1.0, alpha=0.25, steps=10, seed=0)
    within(x_2, x, l2=1.0)
    assert accuracy(model, x_2, y) < 0.5 * clean
    eps = torch.full((x.shape[0],), 0.1)
    eps[:50] = 0.0
    x_p = PGD(model, eps, 0.02, 5, seed=0)(x, y)
    assert torch.equal(x_p[:50], x[:50])
    within(x_p, x, eps=0.1)
    eps2 = torch.full((x.shape[0],), 0.5)
    x_p2 = PGDL2(model, eps2, 0.2, 5, seed=0)(x, y)
    within(x_p2, x, l2=0.5)


# ---------------------------------------------------------------------------------------------
# DeepFool
# ---------------------------------------------------------------------------------------------
def test_deepfool(setup):
    model, x, y, _ = setup
    snap = Snapshot(model)
    res = deepfool(model, x, y, steps=50)
    snap.check()
    within(res.x_adv, x)
    clean_ok = model.eval()(x).argmax(1) == y
    assert res.success[clean_ok].double().mean().item() > 0.95
    torch.testing.assert_close(res.perturbation, res.x_adv - x)
    ratio = (res.x_adv - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    torch.testing.assert_close(res.ratio, ratio)
    torch.testing.assert_close(res.rho_adv, ratio.mean())
    assert 0 < res.rho_adv.item() < 1
    assert res.iterations.max().item() <= 50 and torch.all(res.iterations[~clean_ok] == 0)
    # DeepFool finds small perturbations: far below what FGSM needs for the same success
    assert res.ratio[clean_ok].median() < 0.5
    # the max-residue-ratio budget d (eq. 8) bounds ||eta|| / ||x|| and leaves more samples correct
    d = 0.5 * res.ratio[clean_ok].median().item()
    bounded = DeepFool(model, 50, max_residue_ratio=d)(x, y)
    assert bounded.ratio.max().item() <= d + 1e-5
    assert accuracy(model, bounded.x_adv, y) > accuracy(model, res.x_adv, y)
    # batched == per-image (samples are independent in eval mode)
    one = deepfool(model, x[3:4], y[3:4])
    torch.testing.assert_close(one.x_adv, res.x_adv[3:4], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# C&W, JSMA, one-pixel, substitute
# ---------------------------------------------------------------------------------------------
def test_cw_l2(setup):
    model, x, y, _ = setup
    x, y = x[:40], y[:40]
    snap = Snapshot(model)
    atk = CWL2(model, c=1.0, kappa=0.0, steps=60, lr=0.05, binary_search_steps=3)
    x_adv = atk(x, y)
    snap.check()
    within(x_adv, x)
    res = atk.last_result
    clean_ok = model.eval()(x).argmax(1) == y
    assert res.success[clean_ok].double().mean().item() > 0.9
    assert accuracy(model, x_adv, y) < 0.2
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(l2[res.success], res.l2[res.success], atol=1e-4, rtol=1e-4)
    assert torch.all(x_adv[~res.success] == x[~res.success])
    # minimal-ish: C&W's distortion is below PGD-L2's budget it would need
    assert l2[res.success].mean() < 1.5
    t = other_targets(model, x)
    x_t = cw_l2(model, x, t, c=1.0, steps=60, lr=0.05, binary_search_steps=3, targeted=True, kappa=0.5)
    assert (model(x_t).argmax(1) == t).double().mean().item() > 0.8


def test_jsma_targeted(setup):
    model, x, y, _ = setup
    x, y = x[:40], y[:40]
    t = other_targets(model, x)
    snap = Snapshot(model)
    atk = JSMA(model, theta=1.0, gamma=0.4)
    x_adv = atk(x, t)
    snap.check()
    within(x_adv, x)
    res = atk.last_result
    assert res.success.double().mean().item() > 0.6
    assert torch.equal(res.success, model.eval()(x_adv).argmax(1) == t)
    changed = (x_adv != x).flatten(1).sum(1)
    assert changed.max().item() <= int(0.4 * 64)
    assert torch.all(x_adv >= x)  # theta > 0 only increases features
    # bounded memory: a small candidate set still works (approximate pair search)
    x_small = jsma(model, x, t, theta=1.0, gamma=0.4, max_candidates=8)
    assert (model(x_small).argmax(1) == t).double().mean().item() > 0.3


def test_one_pixel(setup):
    model, x, y, _ = setup
    x, y = x[:12], y[:12]
    snap = Snapshot(model)
    atk = OnePixel(model, pixels=3, steps=15, popsize=60, seed=0)
    x_adv = atk(x, y)
    snap.check()
    within(x_adv, x)
    assert torch.all((x_adv != x).flatten(1).sum(1) <= 3)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)
    res = atk.last_result
    assert torch.equal(res.success, model.eval()(x_adv).argmax(1) != y)
    assert torch.equal(one_pixel(model, x, y, pixels=3, steps=15, popsize=60, seed=0), x_adv)  # seeded
    t = other_targets(model, x[:4])
    atk_t = OnePixel(model, pixels=3, steps=15, popsize=60, targeted=True, seed=0)
    x_t = atk_t(x[:4], t)
    assert torch.all((x_t != x[:4]).flatten(1).sum(1) <= 3)
    assert torch.equal(atk_t.last_result.success, model.eval()(x_t).argmax(1) == t)


def test_substitute_attack(setup):
    model, x, y, x_tr = setup
    snap = Snapshot(model)
    torch.manual_seed(1)
    sub = models.small_cnn()
    res = substitute_attack(model, x_tr[:100], x, y, eps=[0.1, 0.3], substitute=sub, rounds=3, epochs=8,
                            lr=3e-3, lam=0.1, seed=0)
    snap.check()
    assert res.substitute is sub and res.queries == 100 * 2 ** 2  # Papernot's count: each point labelled once
    assert res.x_adv.shape == (2, *x.shape)
    for k, e in enumerate([0.1, 0.3]):
        within(res.x_adv[k], x, eps=e)
    assert res.agreement > 0.6
    assert res.adv_accuracy[1] < res.clean_accuracy - 0.2
    assert res.adv_accuracy[1] <= res.adv_accuracy[0]


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
class Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)


def test_bad_inputs(setup):
    model, x, y, _ = setup
    with pytest.raises(ValueError, match=r"x must lie in \[lo, hi\]"):
        fgsm(model, x * 2, y, 0.1)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pgd(model, bad, y)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        deepfool(model, bad, y)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(ValueError, match="eps"):
        robust_accuracy_curve(model, (x, y), [0.1, -0.2])
    with pytest.raises(ValueError, match="eps"):
        PGD(model, eps=torch.full((3,), 0.1))(x, y)
    with pytest.raises(ValueError, match="shape mismatch"):
        fgsm(model, x, y[:-1], 0.1)
    with pytest.raises(ValueError, match="shape mismatch"):
        robust_accuracy_curve(model, (x, y[:-1]), [0.1])
    with pytest.raises(TypeError, match="y must be an integer tensor"):
        fgsm(model, x, y.float(), 0.1)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fgsm(Flat(), x, y, 0.1)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        robust_accuracy_curve(Flat(), (x, y), [0.1])
    with pytest.raises(ValueError, match="target labels"):
        fgsm(model, x, None, 0.1, targeted=True)
    with pytest.raises(ValueError, match="has 10 outputs"):
        fgsm(model, x, y + 10, 0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        FGSM(lambda t: t, 0.1)
    with pytest.raises(ValueError, match="max_residue_ratio"):
        DeepFool(model, max_residue_ratio=-1)
    with pytest.raises(ValueError, match="gamma"):
        JSMA(model, gamma=2.0)
    with pytest.raises(ValueError, match="lo < hi"):
        FGSM(model, 0.1, lo=1.0, hi=0.0)
    with pytest.raises(TypeError, match="data must be"):
        robust_accuracy_curve(model, x, [0.1])
    with pytest.raises(ValueError, match="no targeted mode"):
        DeepFool(model, targeted=True)


def test_jsma_large_input_bounded_candidates():
    # 28x28 = 784 features: the exact pair table would be 784^2 per sample; m=32 bounds it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x = torch.rand(6, 1, 28, 28) * 0.5
    with torch.no_grad():
        t = (model(x).argmax(1) + 3) % 10
    atk = JSMA(model, theta=1.0, gamma=0.05, max_candidates=32)
    x_adv = atk(x, t)
    within(x_adv, x)
    changed = (x_adv != x).flatten(1).sum(1)
    assert changed.max().item() <= int(0.05 * 784)
    assert torch.equal(atk.last_result.success, model(x_adv).argmax(1) == t)
    assert atk.last_result.success.any()  # a linear model is easy to steer
