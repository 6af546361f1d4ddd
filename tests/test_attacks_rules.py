"""The shared rules in every attack entry point (issues 9, 14 and 17).

Each test runs all eleven entry points (fgsm, FGSM, robust_accuracy_curve, pgd, pgd_l2, bim,
deepfool, cw_l2, jsma, one_pixel, substitute_attack) on small 8x8 inputs with tiny models, so
the file stays fast; the paper-level checks at the end use a small CNN trained on the digits.
"""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robustops import data, models
from robustops._checks import EmptyDataError
from robustops.attacks import (BIM, CWL2, FGSM, JSMA, PGD, DeepFool, OnePixel, bim, cw_l2, deepfool, fgsm, jsma,
                               one_pixel, pgd, pgd_l2, robust_accuracy_curve, substitute_attack)
from robustops.attacks.pgd import auto_batch_size, kurakin_steps

torch.set_num_threads(1)


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _batch(n=6, seed=0, hi=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * hi
    x[:, :, :2] = 0.0  # black pixels (where sqrt has an infinite derivative)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _sub():
    with torch.inference_mode(False):  # a model built by the user outside inference mode
        return _linear(7)


ENTRY = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, 0.1),
    "FGSM": lambda m, x, y: FGSM(m, 0.1)(x, y),
    "curve": lambda m, x, y: robust_accuracy_curve(m, (x, y), [0.0, 0.1, 0.3]),
    "pgd": lambda m, x, y: pgd(m, x, y, eps=0.1, alpha=0.03, steps=3, seed=0),
    "pgd_l2": lambda m, x, y: pgd_l2(m, x, y, eps=0.5, alpha=0.2, steps=3, seed=0),
    "bim": lambda m, x, y: bim(m, x, y, eps=0.1, alpha=0.03, steps=3),
    "deepfool": lambda m, x, y: deepfool(m, x, y, steps=5).x_adv,
    "cw_l2": lambda m, x, y: cw_l2(m, x, y, c=1.0, steps=5, binary_search_steps=2),
    "jsma": lambda m, x, y: jsma(m, x, y, gamma=0.1),  # y: random target classes
    "one_pixel": lambda m, x, y: one_pixel(m, x, y, steps=2, popsize=12, seed=0),
    "substitute": lambda m, x, y: substitute_attack(m, x, x, y, eps=[0.1], substitute=_sub(), rounds=2, epochs=1,
                                                    batch_size=8, seed=0).x_adv[0],
}
IMAGE_ENTRIES = [k for k in ENTRY if k != "curve"]


# ---------------------------------------------------------------------------------------------
# issue 9 item 2: non-finite logits -> ValueError; non-finite gradients -> finite outputs
# ---------------------------------------------------------------------------------------------
class NaNLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _linear()

    def forward(self, x):
        return self.net(x) * float("nan")


class NaNAway(nn.Module):
    """Finite logits on the clean batch (pixels <= 0.5), NaN logits once a pixel exceeds 0.55."""

    def __init__(self):
        super().__init__()
        self.net = _linear()

    def forward(self, x):
        z = self.net(x)
        far = x.flatten(1).amax(1, keepdim=True) > 0.55
        return torch.where(far, torch.full_like(z, float("nan")), z)


class SqrtNet(nn.Module):
    """sqrt at black pixels: an infinite input gradient (inf * weight, and 0 * inf = NaN)."""

    def __init__(self):
        super().__init__()
        self.net = _linear()

    def forward(self, x):
        return self.net(torch.sqrt(x)) * 3


@pytest.mark.parametrize("name", list(ENTRY))
def test_nan_logits_raise(name):
    x, y = _batch()
    with pytest.raises(ValueError, match="NaN or Inf logits"):
        ENTRY[name](NaNLogits(), x, y)


@pytest.mark.parametrize("name", ["curve", "pgd", "pgd_l2", "bim", "deepfool", "cw_l2", "jsma", "one_pixel",
                                  "substitute"])
def test_nan_logits_at_iterates_raise(name):
    # the clean forward is finite; the attack's own forwards (iterates, candidates, the curve's
    # adversarial batches, the substitute's augmented points) meet NaN logits
    x, _ = _batch()
    model = NaNAway()
    with torch.no_grad():
        y = model(x).argmax(1)  # correctly classified: every sample gets attacked
    run = {
        "curve": lambda m: robust_accuracy_curve(m, (x, y), [0.0, 0.3]),
        "pgd": lambda m: pgd(m, x, y, eps=0.3, alpha=0.1, steps=3, seed=0),
        "pgd_l2": lambda m: pgd_l2(m, x, y, eps=3.0, alpha=1.0, steps=3, seed=0),
        "bim": lambda m: bim(m, x, y, eps=0.3, alpha=0.1, steps=3),
        "deepfool": lambda m: deepfool(m, x, y, steps=20, overshoot=5.0),
        "cw_l2": lambda m: cw_l2(m, x, y, c=100.0, steps=30, lr=0.5, binary_search_steps=1),
        "jsma": lambda m: jsma(m, x, (y + 1) % 10, gamma=0.2),
        "one_pixel": lambda m: one_pixel(m, x, y, steps=2, popsize=30, seed=0),
        "substitute": lambda m: substitute_attack(m, x, x, y, eps=[0.1], substitute=_sub(), rounds=2, epochs=1,
                                                  lam=0.3, seed=0),
    }[name]
    with pytest.raises(ValueError, match="NaN or Inf logits"):
        run(model)


@pytest.mark.parametrize("name", list(ENTRY))
def test_infinite_gradients_give_finite_outputs(name):
    x, y = _batch()
    model = SqrtNet()
    xg = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(xg), y).backward()
    assert not torch.isfinite(xg.grad).all()  # the model really has non-finite input gradients
    if name == "substitute":
        out = substitute_attack(model, x, x, y, eps=[0.1], substitute=SqrtNet(), rounds=2, epochs=1, seed=0).x_adv[0]
    else:
        out = ENTRY[name](model, x, y)
    assert torch.isfinite(out).all()
    if name != "curve":
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert out.shape == x.shape


def test_infinite_gradient_direction_is_the_limit():
    # one pixel with an infinite derivative dominates: PGD-L2 moves along it, FGSM's sign too
    x, y = _batch(1)
    model = SqrtNet()
    out = pgd_l2(model, x, y, eps=0.3, alpha=0.3, steps=1, random_start=False)
    d = (out - x).flatten()
    assert torch.isfinite(d).all() and 0 < float(d.norm()) <= 0.3 + 1e-6
    assert int((d != 0).sum()) <= int((x.flatten() == 0).sum())  # only black pixels (inf gradient) move


# ---------------------------------------------------------------------------------------------
# issue 14 item 1: model-output containers
# ---------------------------------------------------------------------------------------------
class HFOutput:
    def __init__(self, logits):
        self.logits = logits


class Wrap(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net = _linear()
        self.kind = kind

    def forward(self, x):
        z = self.net(x)
        return {"tuple": lambda: (z, z.softmax(1)), "list": lambda: [z], "dict": lambda: {"out": z},
                "hf": lambda: HFOutput(z), "hfdict": lambda: {"logits": z, "aux": z.sum()}}[self.kind]()


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
@pytest.mark.parametrize("name", list(ENTRY))
def test_container_outputs_refused(name, kind):
    x, y = _batch(4)
    with pytest.raises(ValueError, match="SelectOutput"):
        ENTRY[name](Wrap(kind), x, y)


@pytest.mark.parametrize("kind", ["hf", "hfdict"])
@pytest.mark.parametrize("name", list(ENTRY))
def test_logits_field_outputs_equal_plain_model(name, kind):
    x, y = _batch(4)
    wrapped = Wrap(kind)
    assert torch.equal(ENTRY[name](wrapped, x, y), ENTRY[name](wrapped.net, x, y))


# ---------------------------------------------------------------------------------------------
# issue 14 items 3 and 4: inference_mode and integer label dtypes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ENTRY))
def test_inference_mode_equals_plain_call(name):
    x, y = _batch(5)
    model = _linear()
    ref = ENTRY[name](model, x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        out = ENTRY[name](model, xi, yi)
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(ENTRY[name](model, x, y), ref)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
@pytest.mark.parametrize("name", list(ENTRY))
def test_integer_label_dtypes(name, dtype):
    x, y = _batch(5)
    model = _linear()
    assert torch.equal(ENTRY[name](model, x, y.to(dtype)), ENTRY[name](model, x, y))


@pytest.mark.parametrize("name", list(ENTRY))
def test_float_and_out_of_range_labels_refused(name):
    x, y = _batch(4)
    model = _linear()
    with pytest.raises(TypeError, match="integer"):
        ENTRY[name](model, x, y.float())
    y_bad = y.clone()
    y_bad[1] = 10
    with pytest.raises(ValueError, match="10 outputs"):
        ENTRY[name](model, x, y_bad)


# ---------------------------------------------------------------------------------------------
# issue 9 item 8: the curve through the shared data checks
# ---------------------------------------------------------------------------------------------
def test_curve_data_forms_and_checks():
    x, y = _batch(20)
    model = _linear()
    eps = [0.0, 0.1, 0.2]
    ref = robust_accuracy_curve(model, (x, y), eps, batch_size=8)
    # independent reference: per-eps FGSM by hand (summed cross-entropy, sign step, clamp)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    expect = [float((model(torch.clamp(x + e * g.sign(), 0, 1)).argmax(1) == y).double().mean()) for e in eps]
    assert ref.tolist() == expect
    assert torch.equal(robust_accuracy_curve(model, [x, y], eps), ref)                       # 2-list pair
    batches = [(x[:7], y[:7]), (x[7:7], y[7:7]), (x[7:], y[7:].int())]                       # list, empty batch, int32
    assert torch.equal(robust_accuracy_curve(model, batches, eps), ref)
    assert torch.equal(robust_accuracy_curve(model, DataLoader(TensorDataset(x, y), batch_size=6), eps), ref)
    with pytest.raises(ValueError, match="10 outputs"):
        robust_accuracy_curve(model, (x, torch.full_like(y, 10)), eps)
    with pytest.raises(TypeError, match="integer"):
        robust_accuracy_curve(model, (x, y.float()), eps)
    with pytest.raises(ValueError, match=r"\[lo, hi\]"):
        robust_accuracy_curve(model, (x + 1, y), eps)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        robust_accuracy_curve(model, (bad, y), eps)
    with pytest.raises(EmptyDataError):
        robust_accuracy_curve(model, [], eps)
    with pytest.raises(EmptyDataError):
        robust_accuracy_curve(model, (x[:0], y[:0]), eps)
    with pytest.raises(TypeError, match="data"):
        robust_accuracy_curve(model, [x], eps)


# ---------------------------------------------------------------------------------------------
# issue 9 item 6 / issue 17 item 5: the substitute attack
# ---------------------------------------------------------------------------------------------
class CountingOracle(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.net(x)


def test_substitute_reproducible_and_leaves_global_rng():
    x_tr, y_tr = data.as_tensors(data.load("digits", split="train", size=12))
    oracle = _linear()
    oracle = nn.Sequential(nn.Flatten(), nn.Linear(144, 10))
    x_seed, x_att, y_att = x_tr[:30], x_tr[100:140], y_tr[100:140]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = substitute_attack(oracle, x_seed, x_att, y_att, eps=[0.1, 0.3], rounds=2, epochs=2, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is untouched
    torch.manual_seed(999)  # another global state: the default substitute must not depend on it
    b = substitute_attack(oracle, x_seed, x_att, y_att, eps=[0.1, 0.3], rounds=2, epochs=2, seed=0)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.adv_accuracy, b.adv_accuracy)
    for pa, pb in zip(a.substitute.parameters(), b.substitute.parameters()):
        assert torch.equal(pa, pb)
    c = substitute_attack(oracle, x_seed, x_att, y_att, eps=[0.1, 0.3], rounds=2, epochs=2, seed=1)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.substitute.parameters(), c.substitute.parameters()))


def test_substitute_queries_papernot_count():
    # Papernot et al.: 150 seed images, 3 rounds -> |S_2| = 600 labelled points
    x_tr, y_tr = data.as_tensors(data.load("digits", split="train"))
    oracle = CountingOracle(_linear())
    x_att, y_att = x_tr[200:240], y_tr[200:240]
    res = substitute_attack(oracle, x_tr[:150], x_att, y_att, eps=[0.1, 0.2], substitute=_sub(), rounds=3,
                            epochs=1, seed=0)
    assert res.queries == 600
    # everything the oracle saw: the 600 training labels, a 1-image shape probe, and the
    # evaluation (x_attack once + once per eps)
    assert oracle.rows == 600 + 1 + 40 * (1 + 2)


# ---------------------------------------------------------------------------------------------
# issue 17 item 4: bounds are parameters, eps-derived defaults scale with hi - lo
# ---------------------------------------------------------------------------------------------
def test_bim_kurakin_rule_scales_with_bounds():
    assert kurakin_steps(8 / 255) == 10 and kurakin_steps(8, 0, 255) == 10  # min(8 + 4, 1.25 * 8)
    assert kurakin_steps(2 / 255) == 2 and kurakin_steps(16, 0, 255) == 20 and kurakin_steps(0.0) == 0
    model = _linear()
    atk = BIM(model, eps=8, steps=None, lo=0, hi=255)
    assert atk.steps == 10 and atk.alpha == pytest.approx(1.0)
    assert BIM(model, steps=None).steps == 10 and BIM(model).alpha == pytest.approx(1 / 255)
    assert PGD(model, lo=0, hi=255).eps == pytest.approx(8.0) and PGD(model, lo=0, hi=255).alpha == pytest.approx(2.0)
    assert FGSM(model, lo=-1, hi=1).eps == pytest.approx(16 / 255)
    # the [0, 255] attack is the [0, 1] attack in other units (same model on x / 255)
    x, y = _batch(6)
    m255 = nn.Sequential(_Scale(1 / 255), model)
    a = bim(m255, x * 255, y, eps=8, steps=None, lo=0, hi=255)
    b = bim(model, x, y, eps=8 / 255, steps=None)
    torch.testing.assert_close(a / 255, b, atol=1e-5, rtol=0)


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


# ---------------------------------------------------------------------------------------------
# issue 14 item 2 / issue 17 items 1 and 5: JSMA's budget is a hard maximum
# ---------------------------------------------------------------------------------------------
def test_jsma_gamma_too_small_for_a_pair():
    x, _ = _batch(8)
    model = _linear()
    with torch.no_grad():
        t = (model(x).argmax(1) + 1) % 10
    with pytest.raises(ValueError, match="gamma=0.01 is too small for a pair.*gamma >= 0.03125"):
        JSMA(model, theta=1.0, gamma=0.01)(x, t)


@pytest.mark.parametrize("gamma", [2 / 64, 0.05, 0.1, 0.29, 0.5])
def test_jsma_never_exceeds_budget(gamma):
    x, _ = _batch(8)
    model = _linear()
    with torch.no_grad():
        t = (model(x).argmax(1) + 3) % 10
    atk = JSMA(model, theta=1.0, gamma=gamma)
    x_adv = atk(x, t)
    changed = (x_adv != x).flatten(1).sum(1)
    assert int(changed.max()) <= math.floor(gamma * 64 + 1e-9)
    torch.testing.assert_close(atk.last_result.distortion, changed.float() / 64)
    assert torch.equal(atk.last_result.success, model(x_adv).argmax(1) == t)


# ---------------------------------------------------------------------------------------------
# issue 17 item 2: C&W and one-pixel at the papers' settings
# ---------------------------------------------------------------------------------------------
class SumNet(nn.Module):
    """Class 1 iff the mean pixel exceeds 0.1: from a black image the smallest L2 change is
    every pixel raised to 0.1 (L2 = 0.1 * sqrt(64) = 0.8)."""

    def forward(self, x):
        s = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([torch.zeros_like(s), 20 * (s - 0.1)], 1)


def test_cw_saturated_pixels_move():
    x = torch.zeros(2, 1, 8, 8)
    y = torch.zeros(2, dtype=torch.long)
    atk = CWL2(SumNet(), c=1.0, steps=100, lr=0.05, binary_search_steps=3)
    x_adv = atk(x, y)
    res = atk.last_result
    assert res.success.all()
    assert float(res.l2.max()) < 0.8 * 1.1  # near the closed-form minimum 0.8
    assert float(x_adv.min()) >= 0.0


def test_cw_defaults_and_constant_used():
    atk = CWL2(_linear())
    assert (atk.c, atk.steps, atk.binary_search_steps, atk.lr) == (1e-2, 1000, 9, 1e-2)
    x, y = _batch(6)
    one = CWL2(_linear(), c=0.5, steps=20, binary_search_steps=1)
    one(x, y)
    assert torch.all(one.last_result.c == 0.5)  # one round: the constant used is the initial one


def test_cw_authors_repeat_round():
    # c0 so small that 9 rounds (c0 * 10^8 at most) never succeed; with 10 rounds the authors'
    # last round runs at the upper bound, 1e10 for samples that never succeeded
    x = torch.zeros(2, 1, 8, 8)
    y = torch.zeros(2, dtype=torch.long)
    nine = CWL2(SumNet(), c=1e-12, steps=50, lr=0.05, binary_search_steps=9)
    nine(x, y)
    assert not nine.last_result.success.any()
    ten = CWL2(SumNet(), c=1e-12, steps=50, lr=0.05, binary_search_steps=10)
    ten(x, y)
    assert ten.last_result.success.all() and torch.all(ten.last_result.c == 1e10)


def test_one_pixel_presets():
    model = _linear()
    assert (OnePixel(model).steps, OnePixel(model).popsize) == (30, 100)
    paper = OnePixel(model, preset="paper")
    assert (paper.steps, paper.popsize) == (100, 400)
    assert OnePixel(model, 5, preset="paper", steps=7).steps == 7
    with pytest.raises(ValueError, match="preset"):
        OnePixel(model, preset="su")


# ---------------------------------------------------------------------------------------------
# PGD: chunking over the batch changes nothing
# ---------------------------------------------------------------------------------------------
def test_pgd_chunking_is_exact():
    x, y = _batch(23)
    model = _linear()
    full = PGD(model, 0.1, 0.02, 4, seed=3, batch_size=23)(x, y)
    for bs in (1, 5, 7):
        assert torch.equal(PGD(model, 0.1, 0.02, 4, seed=3, batch_size=bs)(x, y), full)
    eps = torch.linspace(0, 0.2, 23)
    a = PGD(model, eps, 0.02, 4, seed=3, batch_size=23)(x, y)
    assert torch.equal(PGD(model, eps, 0.02, 4, seed=3, batch_size=4)(x, y), a)
    assert torch.equal(a[0], x[0])
    assert auto_batch_size(torch.zeros(256, 1, 28, 28)) == 83 and auto_batch_size(torch.zeros(9, 1, 8, 8)) == 9
    assert auto_batch_size(torch.zeros(256, 3, 32, 32)) == 64 and auto_batch_size(torch.zeros(64, 3, 224, 224)) == 16
    assert auto_batch_size(torch.zeros(5000, 1, 8, 8)) == 1024 and auto_batch_size(torch.zeros(3000, 100)) == 655


# ---------------------------------------------------------------------------------------------
# issue 17 item 1: DeepFool's d judged on the returned example
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_cnn():
    x_tr, y_tr = data.as_tensors(data.load("digits", split="train"))
    x_te, y_te = data.as_tensors(data.load("digits", split="test"))
    torch.manual_seed(0)
    model = models.small_cnn()
    models.train(model, (x_tr, y_tr), epochs=5, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    return model.eval(), x_te[:200], y_te[:200]


def test_deepfool_capped_equals_uncapped_thresholded(digits_cnn):
    model, x, y = digits_cnn
    free = DeepFool(model, 50)(x, y)
    clean_ok = model(x).argmax(1) == y
    for d in (0.1, 0.2):
        capped = DeepFool(model, 50, max_residue_ratio=d)(x, y)
        broken = free.success & (free.ratio <= d)
        assert torch.equal(capped.success, broken)
        assert float(capped.ratio.max()) <= d
        ratio = (capped.x_adv - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
        torch.testing.assert_close(capped.ratio, ratio)
        robust = (clean_ok & ~capped.success).double().mean()
        assert robust == (clean_ok & ~broken).double().mean()
        assert torch.equal(model(capped.x_adv).argmax(1) != y, capped.success)
