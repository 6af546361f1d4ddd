"""APGD / APGD-T / FAB / Square / AutoAttack: closed-form answers on linear models, the papers'
invariants, the authors' reference code (pyautoattack, when installed), integrity flags on
deliberately masked models, streaming + checkpoint resume, bad input, determinism, model guard."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import free_port
import torch
from torch import nn

from robustops.attacks import APGD, APGDT, FAB, AutoAttack, Square
from robustops.attacks._aa import apgd_checkpoints, dlr_loss, dlr_loss_targeted
from robustops.attacks.autoattack import (GradientMaskingWarning, LargeEpsAccuracyWarning, ProbabilityOutputWarning,
                                          RandomizedModelWarning, ZeroGradientWarning)

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- models ------------------------------------------------------------------------------------
class Linear(nn.Module):
    """f(x) = W flatten(x) + b on [N, 1, 4, 4] images."""

    def __init__(self, C=5, D=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(D, C)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(C, D, generator=g))
            # centred at the grey image, so the interior points lie near the decision boundaries
            self.fc.bias.copy_(-0.5 * self.fc.weight.sum(1) + 0.1 * torch.randn(C, generator=g))

    def forward(self, x):
        return self.fc(x.flatten(1))


def linear_min_dist(model, x, y, norm):
    """Closed-form minimal perturbation of a linear classifier without the box constraint:
    min_j (z_y - z_j) / ||w_y - w_j||_q (q the dual norm)."""
    W, z = model.fc.weight.detach(), model(x).detach()
    out = []
    for i in range(x.shape[0]):
        best = float("inf")
        for j in range(W.shape[0]):
            if j == int(y[i]):
                continue
            dw = W[y[i]] - W[j]
            q = dw.abs().sum() if norm == "Linf" else dw.norm()
            best = min(best, float((z[i, y[i]] - z[i, j]) / q))
        out.append(best)
    return torch.tensor(out)


def _linear_case(norm, n=24, C=5):
    torch.manual_seed(0)
    model = Linear(C=C)
    x = 0.4 + 0.2 * torch.rand(n, 1, 4, 4)  # interior points: the box stays inactive
    y = model(x).argmax(1)
    dmin = linear_min_dist(model, x, y, norm)
    cap = 0.3 if norm == "Linf" else 0.3  # keep the ball inside the box (Linf), a cheap bound (L2)
    keep = dmin < cap
    return model, x[keep], y[keep], dmin[keep]


@pytest.fixture(scope="module")
def digits_model():
    from robustops import data, models
    x, y = data.as_tensors(data.load("digits", split="test"))
    model = models.small_cnn()
    models.train(model, data.as_tensors(data.load("digits", split="train")), epochs=3, optimizer="adam", lr=3e-3,
                 batch_size=32, seed=0)
    model.eval()
    return model, x[:40], y[:40]


def _valid(x, x_adv, eps, norm, lo=0.0, hi=1.0):
    d = (x_adv - x).reshape(x.shape[0], -1)
    n = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    return bool((n <= eps * (1 + 1e-5) + 1e-7).all() and x_adv.min() >= lo and x_adv.max() <= hi)


# ---- pieces ------------------------------------------------------------------------------------
def test_dlr_losses_match_the_formulas():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.5, -1.0], [0.0, 4.0, 1.0, 3.0, 2.0]])
    y = torch.tensor([0, 2])
    # sorted desc: row0 3,2,1,.5,-1; row1 4,3,2,1,0
    assert dlr_loss(z, y).tolist() == pytest.approx([-(3 - 2) / (3 - 1), -(1 - 4) / (4 - 2)])
    t = torch.tensor([2, 3])
    assert dlr_loss_targeted(z, y, t).tolist() == pytest.approx(
        [-(3 - 2) / (3 - 0.5 * (1 + 0.5)), -(1 - 3) / (4 - 0.5 * (2 + 1))])
    # scale invariance: the reason DLR survives saturated logits
    assert torch.allclose(dlr_loss(1000 * z, y), dlr_loss(z, y))


def test_checkpoints_follow_the_paper():
    # p = 0, 0.22, then steps shrinking by 0.03 down to 0.06 (of 100 iterations)
    cps = apgd_checkpoints(100)
    gaps = [cps[0] + 1] + [b - a for a, b in zip(cps, cps[1:])]
    assert gaps[:5] == [22, 19, 16, 13, 10] and set(gaps[5:]) == {7, 6} - {7} | ({7} if 7 in gaps else set())
    assert all(g >= 6 for g in gaps) and cps[-1] <= 99


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_apgd_and_fab_on_linear_models_match_the_closed_form(norm):
    # two classes: the cross-entropy gradient points along w_other - w_y, so APGD-CE reaches the
    # closed-form minimal distance: broken just above it, never below it
    model2, x2, y2, dmin2 = _linear_case(norm, C=2)
    assert x2.shape[0] >= 5
    for i in range(x2.shape[0]):
        for f, want in ((1.02, True), (0.98, False)):
            atk = APGD(model2, norm=norm, eps=float(dmin2[i]) * f, steps=100, seed=0)
            x_adv = atk(x2[i:i + 1], y2[i:i + 1])
            assert bool(atk.last_success[0]) == want, (i, f)
            assert _valid(x2[i:i + 1], x_adv, float(dmin2[i]) * f, norm)
    model, x, y, dmin = _linear_case(norm)
    assert x.shape[0] >= 5
    eps_hi = float(dmin.max()) * 1.02
    atk = FAB(model, norm=norm, eps=eps_hi, targeted=False, steps=100, seed=0)
    x_adv = atk(x, y)
    assert _valid(x, x_adv, eps_hi, norm) and atk.last_success.all()
    assert (model(x_adv).argmax(1) != y).all()
    # untargeted FAB finds the minimal perturbation itself (no early stop)
    fab = FAB(model, norm=norm, eps=1.0, targeted=False, early_stop=False, steps=100, seed=0)
    fab(x, y)
    torch.testing.assert_close(fab.last_distance, dmin.to(fab.last_distance), rtol=0.02, atol=1e-4)


def test_autoattack_verdicts_on_linear_model():
    model, x, y, dmin = _linear_case("Linf")
    ds = dmin.sort()[0]
    k = int((ds[1:] - ds[:-1])[len(ds) // 4: 3 * len(ds) // 4].argmax()) + len(ds) // 4
    eps = float(ds[k] + ds[k + 1]) / 2  # halfway between two minimal distances: no point on the sphere
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, warn=False, large_eps_check=False)
    x_adv = aa(x, y)
    r = aa.last_result
    want_robust = dmin > eps
    assert torch.equal(r.robust, want_robust)
    assert r.robust_accuracy == pytest.approx(float(want_robust.float().mean()))
    assert _valid(x, x_adv, eps, "Linf")
    broken = ~r.robust
    assert (model(x_adv[broken]).argmax(1) != y[broken]).all()
    assert torch.equal(x_adv[r.robust], x[r.robust])


def test_square_breaks_linear_model_without_gradients():
    model, x, y, dmin = _linear_case("Linf")
    eps = float(dmin.max()) * 2.0
    sq = Square(model, norm="Linf", eps=eps, n_queries=300, seed=0)
    x_adv = sq(x, y)
    assert _valid(x, x_adv, eps, "Linf")
    assert sq.last_success.float().mean() >= 0.9
    assert (model(x_adv[sq.last_success]).argmax(1) != y[sq.last_success]).all()
    sq2 = Square(model, norm="L2", eps=3.0, n_queries=300, seed=0)
    x2 = sq2(x, y)
    assert _valid(x, x2, 3.0, "L2") and sq2.last_success.float().mean() >= 0.5


def test_invariants_on_trained_cnn(digits_model):
    model, x, y = digits_model
    x, y = x[:24], y[:24]
    for norm, eps in (("Linf", 0.1), ("L2", 0.8)):
        for atk in (APGD(model, norm=norm, eps=eps, steps=20), APGDT(model, norm=norm, eps=eps, steps=20,
                                                                       n_target_classes=3),
                    FAB(model, norm=norm, eps=eps, steps=20, n_target_classes=3),
                    Square(model, norm=norm, eps=eps, n_queries=100)):
            x_adv = atk(x, y)
            assert _valid(x, x_adv, eps, norm), (type(atk).__name__, norm)
            s = atk.last_success
            assert (model(x_adv[s]).argmax(1) != y[s]).all(), (type(atk).__name__, norm)
            assert torch.equal(x_adv[~s], x[~s])


def test_deterministic_and_model_unchanged(digits_model):
    model, x, y = digits_model
    model.train()
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    aa = AutoAttack(model, eps=0.1, attacks=[APGD(model, eps=0.1, steps=30), Square(model, eps=0.1, n_queries=50)],
                    seed=3, warn=False, large_eps_check=False)
    a1 = aa(x[:20], y[:20])
    r1 = aa.last_result.broken_by
    a2 = aa(x[:20], y[:20])
    assert torch.equal(a1, a2) and aa.last_result.broken_by == r1
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    model.eval()


# ---- against the authors' code -------------------------------------------------------------------
@pytest.mark.slow
def test_robust_accuracy_not_above_the_reference(digits_model):
    ref = pytest.importorskip("pyautoattack")
    import logging
    model, x, y = digits_model
    eps = 0.1
    ref_aa = ref.AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce", "apgd-t", "fab-t"],
                            seed=0)
    ref_aa.logger.setLevel(logging.ERROR)
    ref_aa.apgd_targeted.n_target_classes = 9
    ref_aa.fab.n_target_classes = 9
    ref_aa.fab.n_restarts = 1
    ref_aa.apgd.n_restarts = 1
    x_ref, _ = ref_aa.run_standard_evaluation(x, y, batch_size=500)
    acc_ref = float((model(x_ref).argmax(1) == y).float().mean())
    aa = AutoAttack(model, norm="Linf", eps=eps, attacks=["apgd-ce", "apgd-t", "fab-t"], seed=0, warn=False,
                    large_eps_check=False)
    x_adv = aa(x, y)
    r = aa.last_result
    assert r.robust_accuracy <= acc_ref + 0.005 + 1.0 / x.shape[0]  # one point of tolerance on 40
    assert _valid(x, x_adv, eps, "Linf")
    assert float((model(x_adv).argmax(1) == y).float().mean()) == pytest.approx(r.robust_accuracy)


# ---- flags -------------------------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self, model, scale):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(x) * self.scale


class Softmaxed(Scaled):
    def forward(self, x):
        return self.model(x).softmax(1)


class Noisy(Scaled):
    def forward(self, x):
        return self.model(x + 0.05 * torch.randn_like(x))


class Quantized(Scaled):
    """Input quantised with a straight-through-less round: zero gradient almost everywhere, the
    decision itself is as fragile as the base model's."""

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def _flags(model, x, y, **kw):
    aa = AutoAttack(model, eps=kw.pop("eps", 0.1), seed=0, warn=False, **kw)
    aa(x, y)
    return aa.last_result


def test_no_flag_on_an_ordinary_model(digits_model):
    model, x, y = digits_model
    r = _flags(model, x[:20], y[:20], attacks=["apgd-ce"])
    assert r.flags == [], r.flags


def test_flag_saturated_logits(digits_model):
    model, x, y = digits_model
    sat = Scaled(model, 1000.0)
    r = _flags(sat, x[:30], y[:30], attacks=["apgd-ce"])
    names = r.flag_names
    assert ZeroGradientWarning.flag in names and LargeEpsAccuracyWarning.flag in names
    with pytest.warns(ZeroGradientWarning):
        AutoAttack(sat, eps=0.1, attacks=["apgd-ce"], seed=0, large_eps_check=False)(x[:10], y[:10])


def test_flag_softmax_output_and_randomized_model(digits_model):
    model, x, y = digits_model
    r = _flags(Softmaxed(model, 1.0), x[:20], y[:20], attacks=["apgd-ce"], large_eps_check=False)
    assert ProbabilityOutputWarning.flag in r.flag_names
    torch.manual_seed(0)
    r = _flags(Noisy(model, 1.0), x[:20], y[:20], attacks=["apgd-ce"], large_eps_check=False)
    assert RandomizedModelWarning.flag in r.flag_names


def test_flag_square_beats_white_box(digits_model):
    model, x, y = digits_model
    aa = AutoAttack(Quantized(model, 1.0), eps=0.25, attacks=["apgd-ce", "square"], seed=0, warn=False,
                    large_eps_check=False)
    aa.attacks[1][1].n_queries = 300
    aa(x[:30], y[:30])
    r = aa.last_result
    assert r.accuracy_after["square"] < r.accuracy_after["apgd-ce"]
    assert GradientMaskingWarning.flag in r.flag_names
    assert "square" in r.broken_by


def test_curve_flags_non_monotonic(digits_model):
    model, x, y = digits_model
    aa = AutoAttack(model, eps=0.1, attacks=["apgd-ce"], seed=0, warn=False, large_eps_check=False)
    res = aa.curve((x[:10], y[:10]), [0.2, 0.02])
    assert [r.eps for r in res] == [0.02, 0.2] and res[0].robust_accuracy >= res[1].robust_accuracy
    assert aa.eps == 0.1 and "accuracy_not_decreasing" not in res[0].flag_names

    class Weird(nn.Module):  # robust only for large perturbations: moving far restores the class
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    calls = []
    aa2 = AutoAttack(Weird(model), eps=0.1, attacks=["apgd-ce"], seed=0, warn=False, large_eps_check=False)
    orig = aa2.evaluate

    def fake(data, checkpoint=None):  # accuracies 0.3 then 0.5: not decreasing
        r = orig(data)
        r.robust_accuracy = [0.3, 0.5][len(calls)]
        calls.append(1)
        return r

    aa2.evaluate = fake
    res = aa2.curve((x[:10], y[:10]), [0.01, 0.02])
    assert "accuracy_not_decreasing" in res[0].flag_names


# ---- streaming, checkpoint, torchrun ------------------------------------------------------------
def test_evaluate_streams_and_matches_call(digits_model):
    model, x, y = digits_model
    x, y = x[:24], y[:24]
    aa = AutoAttack(model, eps=0.1, attacks=[APGD(model, eps=0.1, steps=20), APGDT(model, eps=0.1, steps=10,
                                                                                   n_target_classes=2)],
                    seed=0, batch_size=8, warn=False)
    aa(x, y)
    want = aa.last_result
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    got = aa.evaluate(loader)
    assert got.broken_by == want.broken_by and got.robust_accuracy == want.robust_accuracy
    assert set(got.time) >= {"apgd-ce", "apgd-t", "clean", "total"}


def test_checkpoint_resume(digits_model, tmp_path):
    model, x, y = digits_model
    path = tmp_path / "aa.pt"
    aa = AutoAttack(model, eps=0.1, attacks=[APGD(model, eps=0.1, steps=20)], seed=0, batch_size=10, warn=False,
                    large_eps_check=False)
    full = aa.evaluate((x, y))

    def interrupted():
        for i in range(0, x.shape[0], 10):
            if i == 30:
                raise KeyboardInterrupt
            yield x[i:i + 10], y[i:i + 10]

    with pytest.raises(KeyboardInterrupt):
        aa.evaluate(interrupted(), checkpoint=path)
    assert path.exists()
    seen = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    try:
        resumed = aa.evaluate((x, y), checkpoint=path)
    finally:
        hook.remove()
    assert resumed.broken_by == full.broken_by
    # the three stored chunks were not attacked again: the first forward is chunk 3's clean pass
    assert len(seen) and seen[0] == 10
    other = AutoAttack(model, eps=0.1, attacks=[APGD(model, eps=0.1, steps=30)], seed=0, batch_size=10, warn=False,
                       large_eps_check=False)
    with pytest.raises(ValueError, match="other settings"):
        other.evaluate((x, y), checkpoint=path)


@pytest.mark.slow
def test_two_cpu_ranks_match_one_process(tmp_path, digits_model):
    model, x, y = digits_model
    torch.save({"state": model.state_dict(), "x": x[:24], "y": y[:24]}, tmp_path / "case.pt")
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed
        from robustops import models, _distributed as rd
        from robustops.attacks import AutoAttack
        torch.set_num_threads(1)
        case = torch.load({str(tmp_path / 'case.pt')!r})
        m = models.small_cnn(); m.load_state_dict(case["state"]); m.eval()
        aa = AutoAttack(m, eps=0.1, attacks=["apgd-ce", "apgd-t"], seed=0, batch_size=8, warn=False)
        xa = aa(case["x"], case["y"])
        r1 = aa.last_result
        r2 = aa.evaluate((case["x"], case["y"]))
        if rd.is_main():
            torch.save({{"codes": r1.broken_by, "codes2": r2.broken_by, "xa": xa}}, {str(tmp_path / 'out.pt')!r})
            print("OK", rd.world())
        rd.barrier()
        torch.distributed.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK (0, 2)" in r.stdout
    out = torch.load(tmp_path / "out.pt")
    aa = AutoAttack(model, eps=0.1, attacks=["apgd-ce", "apgd-t"], seed=0, batch_size=8, warn=False)
    xa = aa(x[:24], y[:24])
    assert out["codes"] == aa.last_result.broken_by == out["codes2"]
    torch.testing.assert_close(out["xa"], xa, rtol=0, atol=1e-6)


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input(digits_model):
    model, x, y = digits_model
    for eps in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            AutoAttack(model, eps=eps)
        with pytest.raises(ValueError, match="eps"):
            APGD(model, eps=eps)
    with pytest.raises(ValueError, match="norm"):
        AutoAttack(model, norm="L1")
    with pytest.raises(ValueError, match="version"):
        AutoAttack(model, version="turbo")
    with pytest.raises(ValueError, match="unknown attack"):
        AutoAttack(model, attacks=["apgd-ce", "deepfool"])
    with pytest.raises(ValueError, match="loss"):
        APGD(model, loss="hinge")
    with pytest.raises(ValueError, match="n_target_classes"):
        APGDT(model, n_target_classes=10)(x[:4], y[:4])
    with pytest.raises(ValueError, match="n_target_classes"):
        AutoAttack(model, attacks=[FAB(model, n_target_classes=12)])(x[:4], y[:4])
    with pytest.raises(ValueError, match="class 12|out of range|y"):
        AutoAttack(model, eps=0.1)(x[:4], torch.tensor([0, 1, 12, 3]))
    with pytest.raises(TypeError):
        AutoAttack(model, eps=0.1)(x[:4], y[:4].float())

    class Tupled(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x), 0

    with pytest.raises(ValueError, match="SelectOutput|logits"):
        AutoAttack(Tupled(model), eps=0.1)(x[:4], y[:4])
    with pytest.raises(ValueError):
        AutoAttack(model, eps=0.1)(x[:4] + 2, y[:4])


def test_versions_use_the_authors_settings():
    model = Linear(C=10)
    std = AutoAttack(model, version="standard")
    assert std.attack_names == ["apgd-ce", "apgd-t", "fab-t", "square"]
    a = dict(std.attacks)
    assert (a["apgd-ce"].steps, a["apgd-ce"].n_restarts, a["apgd-ce"].loss, a["apgd-ce"].rho) == (100, 1, "ce", 0.75)
    assert (a["apgd-t"].steps, a["apgd-t"].n_target_classes) == (100, 9)
    assert (a["fab-t"].steps, a["fab-t"].n_target_classes, a["fab-t"].fab_targeted) == (100, 9, True)
    assert (a["square"].n_queries, a["square"].p_init) == (5000, 0.8)
    plus = dict(AutoAttack(model, version="plus").attacks)
    assert list(plus) == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert plus["apgd-ce"].n_restarts == 5 and plus["fab"].n_restarts == 5 and not plus["fab"].fab_targeted
    rand = dict(AutoAttack(model, version="rand").attacks)
    assert list(rand) == ["apgd-ce", "apgd-dlr"] and rand["apgd-ce"].eot_iter == 20
    fast = AutoAttack(model, version="fast")
    assert fast.attack_names == ["apgd-ce", "apgd-t"] and dict(fast.attacks)["apgd-t"].n_target_classes == 3
    with pytest.raises(ValueError, match="custom list"):
        AutoAttack(model, version="plus", attacks=["apgd-ce"])


def test_square_skipping_unchanged_proposals_keeps_the_search_path(monkeypatch):
    """Square Linf queries the model only on rows whose proposal changed and was not tried from the
    same best, and stops once every proposal of the last stage was tried; forcing a query of every
    row at every iteration must give bit-identical examples, successes and query counts (over two
    restarts: the second one continues the random stream of the first), with more rows forwarded."""
    model, x, y, dmin = _linear_case("Linf")
    eps = float(dmin.median())
    counted = []

    class Count(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, z):
            counted.append(z.shape[0])
            return self.m(z)

    net = Count(model)
    fast = Square(net, norm="Linf", eps=eps, n_queries=400, n_restarts=2, seed=0)
    xa = fast(x, y)
    rows_fast = sum(counted)
    counted.clear()
    orig = Square._loop

    def no_skip(self, *a, skip_unchanged=False, final_from=None):
        return orig(self, *a, skip_unchanged=False)

    monkeypatch.setattr(Square, "_loop", no_skip)
    slow = Square(net, norm="Linf", eps=eps, n_queries=400, n_restarts=2, seed=0)
    xb = slow(x, y)
    rows_slow = sum(counted)
    assert torch.equal(xa, xb)
    assert torch.equal(fast.last_success, slow.last_success)
    assert torch.equal(fast.last_queries, slow.last_queries)
    assert rows_fast < rows_slow
    assert fast._converged_at and all(i < 399 for i in fast._converged_at)  # the early stop was taken


def test_forward_passes_in_pieces_do_not_change_the_attacks(digits_model, monkeypatch):
    """On a CPU APGD and FAB send a large working batch through the model in pieces
    (``row_slices``); rows do not interact in eval mode, so pieces of 7 rows give the same
    verdicts and examples as one pass over everything, and the pieces have equal sizes (rows per
    pass grow with the thread count)."""
    from robustops.attacks import _aa
    model, x, y = digits_model
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pieces = _aa.row_slices(torch.zeros(270, 1, 8, 8))
    assert [s.stop - s.start for s in pieces] == [135, 135]
    assert len(_aa.row_slices(torch.zeros(256, 1, 8, 8))) == 1
    assert _aa.forward_rows(torch.zeros(5, 3, 32, 32)) == 128
    monkeypatch.undo()

    def attacks():
        return [APGDT(model, eps=0.1, steps=10, seed=0), FAB(model, eps=0.1, steps=10, seed=0),
                FAB(model, eps=0.1, steps=10, targeted=False, n_restarts=1, seed=0), APGD(model, eps=0.1, steps=10)]

    atks = attacks()
    whole = [a(x, y) for a in atks]
    whole_success = [a.last_success for a in atks]
    calls = []

    class Count(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, z):
            calls.append(z.shape[0])
            return self.m(z)

    monkeypatch.setattr(_aa, "_CPU_MIN_ROWS", 7)
    monkeypatch.setattr(_aa, "_CPU_ROW_PIXELS", 1)
    atks = attacks()
    pieces = [a(x, y) for a in atks]
    for a, b, sa, atk in zip(whole, pieces, whole_success, atks):
        # same examples up to the last bits a multi-threaded GEMM may round differently per batch size
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
        assert torch.equal(sa, atk.last_success)
    APGDT(Count(model), eps=0.1, steps=2, seed=0)(x, y)
    # every pass of the attack's steps has <= 7 rows per thread (only the clean-prediction pass sees
    # all points)
    k = 7 * torch.get_num_threads()
    assert k < x.shape[0] and k in calls and all(c <= k or c == x.shape[0] for c in calls)
