"""robustops.xai LRP: rules against matrix-form references, invariants, canonizers, restoration, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustops import models, xai
from robustops import nn as rnn
from robustops.xai import rules
from robustops.xai.composites import CONV_TYPES, DENSE_TYPES, LINEAR_TYPES, Composite
from robustops.xai.layers import fold_batchnorm, linear_map

DT = torch.float64


def _randomize_bn(model, gen=None):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def _grad_x_input(model, x, target):
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xi)
    return g * x


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_untouched(model, before):
    sd, modes, req = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert "forward" not in m.__dict__


# ----------------------------------------------------------------------------------------------
# LRP-0 == gradient x input (exactly, float64) on ReLU / max-pool networks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["small_cnn", "papernot_variant", "resnet18_imagenet_stem"])
def test_lrp0_equals_gradient_times_input(arch, device):
    torch.manual_seed(1)
    if arch == "small_cnn":
        model, x = models.small_cnn(), torch.rand(5, 1, 8, 8)
    elif arch == "papernot_variant":
        model, x = rnn.build_variant("SM").model, torch.rand(3, 1, 28, 28)   # Shift + Papernot net
    else:
        model, x = _randomize_bn(models.resnet18(3, stem="imagenet", width=0.125)), torch.rand(2, 3, 40, 40)
    model = model.to(device, DT).eval()
    x = x.to(device, DT)
    target = model(x).argmax(1)
    r = xai.lrp(model, x, target, composite="zero", start="logit")
    ref = _grad_x_input(model, x, target)
    if arch == "papernot_variant":   # the translation x - 0.5 passes gradient: LRP-0 is grad x (x - 0.5)
        ref = ref / x * (x - 0.5)
    assert r.shape == x.shape and r.dtype == x.dtype and r.device == x.device
    torch.testing.assert_close(r, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    # "one_hot" start: the same map divided by the target logit (every rule is linear in R)
    r1 = xai.lrp(model, x, target, composite="zero", start="one_hot")
    logit = model(x).gather(1, target[:, None]).view(-1, *([1] * (x.dim() - 1)))
    torch.testing.assert_close(r1 * logit, r, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# each rule against a matrix-form reference on small layers
# ----------------------------------------------------------------------------------------------
def _dense_matrix(layer, x_shape):
    """[out, in] matrix of the layer's linear part (no bias) by applying it to the basis."""
    n_in = int(torch.tensor(x_shape[1:]).prod())
    eye = torch.eye(n_in, dtype=DT).reshape(n_in, *x_shape[1:])
    lm = linear_map(layer, torch.zeros(x_shape, dtype=DT))
    with torch.no_grad():
        cols = lm.forward(lm.prepare(eye), layer.weight, None, scale_power=0)
    return cols.reshape(n_in, -1).T.contiguous()


def _stab(z, eps):
    return z + ((z == 0).to(z.dtype) + z.sign()) * eps


def _reference(rule_name, M, b, x, R, eps):
    """Matrix-form LRP for one sample: M [J, I], b [J], x [I], R [J] -> [I]."""
    Z = M * x[None, :]                     # z_ji = w_ji x_i
    if rule_name in ("zero", "epsilon"):
        z = Z.sum(1) + b
        s = R / (z if rule_name == "zero" else _stab(z, eps))
        return (Z * s[:, None]).sum(0)
    if rule_name in ("zplus", "alpha2beta1"):
        alpha, beta = (1.0, 0.0) if rule_name == "zplus" else (2.0, 1.0)
        zp, zn = Z.clamp(min=0), Z.clamp(max=0)
        sp = R / _stab(zp.sum(1) + b.clamp(min=0), eps)
        out = alpha * (zp * sp[:, None]).sum(0)
        if beta:
            sn = R / _stab(zn.sum(1) + b.clamp(max=0), eps)
            out = out - beta * (zn * sn[:, None]).sum(0)
        return out
    if rule_name == "flat":
        C = (M != 0).to(DT)
        return (C * (R / _stab(C.sum(1), eps))[:, None]).sum(0)
    if rule_name == "wsquare":
        W2 = M * M
        return (W2 * (R / _stab(W2.sum(1), eps))[:, None]).sum(0)
    raise AssertionError(rule_name)


RULES = {
    "zero": lambda: rules.Zero(),
    "epsilon": lambda: rules.Epsilon(0.3),
    "zplus": lambda: rules.ZPlus(stabilizer=1e-6),
    "alpha2beta1": lambda: rules.AlphaBeta(2.0, 1.0, stabilizer=1e-6),
    "flat": lambda: rules.Flat(stabilizer=1e-6),
    "wsquare": lambda: rules.WSquare(stabilizer=1e-6),
}
EPS = {"zero": 0.0, "epsilon": 0.3, "zplus": 1e-6, "alpha2beta1": 1e-6, "flat": 1e-6, "wsquare": 1e-6}


def _small_layers():
    torch.manual_seed(3)
    return {
        "linear": (nn.Linear(7, 5), (3, 7)),
        "conv": (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
        "conv_strided_groups": (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), (2, 4, 6, 6)),
        "conv_reflect": (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 4, 5)),
        "conv1d": (nn.Conv1d(2, 3, 3, dilation=2), (2, 2, 9)),
        "compact_linear": (rnn.CompactLinear(6, 4, alpha=2.0), (3, 6)),
        "compact_conv": (rnn.CompactConv2d(2, 3, 3, padding=1, alpha=1.5), (2, 2, 5, 5)),
        "compact_conv_negative_alpha": (rnn.CompactConv2d(2, 3, 3, padding=1, alpha=-0.8), (2, 2, 5, 5)),
    }


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("layer_name", list(_small_layers()))
def test_rule_matches_matrix_reference(rule_name, layer_name):
    layer, shape = _small_layers()[layer_name]
    layer = layer.to(DT).eval()
    x = torch.randn(shape, dtype=DT)          # mixed signs: both halves of alpha-beta / z-plus matter
    with torch.no_grad():
        out = layer(x)
    R = torch.randn_like(out)
    lm = linear_map(layer, x)
    (got,) = RULES[rule_name]().relevance(lm, (x,), out, R)
    assert got.shape == x.shape
    M = _dense_matrix(layer, shape)           # [J, I] without the compact scale
    b = torch.zeros(M.shape[0], dtype=DT) if layer.bias is None else \
        layer.bias.detach().repeat_interleave(M.shape[0] // layer.bias.numel())
    for n in range(shape[0]):
        Mn = M
        if lm.scale is not None:              # compact: the patch-normalised linear map c_j * w_ji
            c = float(torch.sign(layer.alpha.detach())) * lm.scale[n]   # the signed c_j = alpha / (||patch_j|| + delta)
            Mn = M * c.expand(out.shape[1:]).reshape(-1, 1)
        if layer_name == "conv_reflect":      # the kernel reads the padded input: map back with the pad adjoint
            continue
        ref = _reference(rule_name, Mn, b, x[n].reshape(-1), R[n].reshape(-1), EPS[rule_name])
        torch.testing.assert_close(got[n].reshape(-1), ref, rtol=1e-9, atol=1e-11)


def test_rule_on_padded_input_sends_copies_back():
    """reflect padding: the relevance of padded copies goes back to the pixel they copy."""
    torch.manual_seed(0)
    layer = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect").to(DT)
    x = torch.randn(2, 1, 4, 4, dtype=DT)
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect").requires_grad_(True)
    plain = nn.Conv2d(1, 2, 3).to(DT)
    plain.load_state_dict(layer.state_dict())
    with torch.no_grad():
        out = layer(x)
    R = torch.randn_like(out)
    (got,) = rules.Epsilon(0.1).relevance(linear_map(layer, x), (x,), out, R)
    (rp,) = rules.Epsilon(0.1).relevance(linear_map(plain, xp.detach()), (xp.detach(),), out, R)
    (ref,) = torch.autograd.grad(F.pad(x.requires_grad_(True), (1, 1, 1, 1), mode="reflect"), x, rp)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got.sum(), rp.sum())


def test_compact_layers_are_their_patch_normalised_linear_map():
    torch.manual_seed(0)
    for layer, shape in [(rnn.CompactConv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, alpha=1.3), (2, 4, 9, 9)),
                         (rnn.CompactConv2d(3, 5, 3, padding="same", padding_mode="circular"), (2, 3, 6, 6)),
                         (rnn.CompactLinear(8, 3, alpha=0.7), (4, 8)), (rnn.L2SoftmaxLinear(8, 3, alpha=5.0), (4, 8))]:
        layer = layer.to(DT)
        x = torch.randn(shape, dtype=DT)
        lm = linear_map(layer, x)
        assert lm.scale is not None and bool((lm.scale > 0).all())
        torch.testing.assert_close(lm.forward(lm.prepare(x), lm.weight, lm.bias), layer(x).detach())


# ----------------------------------------------------------------------------------------------
# canonizers
# ----------------------------------------------------------------------------------------------
def test_batchnorm_fold_reproduces_the_pair():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(3, 4, 3, stride=2), nn.Linear(5, 4)):
        bn = nn.BatchNorm2d(4) if isinstance(conv, nn.Conv2d) else nn.BatchNorm1d(4)
        _randomize_bn(nn.Sequential(bn))
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
        conv, bn = conv.to(DT), bn.to(DT).eval()
        x = torch.randn((2, 3, 7, 7) if isinstance(conv, nn.Conv2d) else (6, 5), dtype=DT)
        folded = fold_batchnorm(linear_map(conv, x), bn)
        torch.testing.assert_close(folded.forward(x, folded.weight, folded.bias), bn(conv(x)).detach())


def test_canonizers_leave_model_output_and_state_unchanged():
    torch.manual_seed(0)
    model = _randomize_bn(models.resnet18(stem="mnist", width=0.125)).to(DT).eval()
    x = torch.rand(3, 1, 28, 28, dtype=DT)
    ref = model(x).detach()
    before = _state(model)
    from robustops.xai.core import _Tracer
    with _Tracer(model, xai.get_composite("epsilon_plus_flat"), None) as tr:
        out = model(x)
        assert any("forward" in m.__dict__ for m in model.modules())   # residual sums routed
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)
    _assert_untouched(model, before)
    # a residual block through the Sum canonizer conserves with bias-free folded layers
    assert len(tr.linear_inputs) > 0


def test_resnet_residual_sum_splits_relevance_by_contribution():
    """With canonizers, LRP-0 on a bias-free ResNet conserves relevance through every residual block
    (z-plus would not: a pre-sum BatchNorm output can carry negative relevance into a unit whose
    positive pre-activation is 0). Without the ResidualSum canonizer autograd copies the relevance
    of each sum to both branches."""
    torch.manual_seed(0)
    model = models.resnet18(stem="mnist", width=0.125).to(DT).eval()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)
    x = torch.rand(2, 1, 28, 28, dtype=DT)
    comp = "zero"
    sums = xai.relevance_sums(model, x, composite=comp)
    for k, v in sums.items():
        if k.endswith("residual") or k in ("fc", "avgpool", "input"):
            torch.testing.assert_close(v, sums["output"], rtol=1e-8, atol=1e-10, msg=k)
    plain = xai.relevance_sums(model, x, composite=comp, canonizers=[xai.MergeBatchNorm()])
    assert float(plain["input"].sum()) > 1.5 * float(plain["output"].sum())


# ----------------------------------------------------------------------------------------------
# conservation, batching, composites
# ----------------------------------------------------------------------------------------------
def _bias_free(model):
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


@pytest.mark.parametrize("rule", [rules.ZPlus(stabilizer=1e-12), rules.AlphaBeta(2, 1, stabilizer=1e-12),
                                  rules.Zero()])
def test_conservation_without_bias(rule):
    torch.manual_seed(0)
    model = _bias_free(models.papernot_mnist()).to(DT).eval()
    x = torch.rand(3, 1, 28, 28, dtype=DT)
    comp = Composite([(LINEAR_TYPES, rule)], first_map=[(LINEAR_TYPES, rules.Flat(1e-12))])
    sums = xai.relevance_sums(model, x, composite=comp)
    assert list(sums)[0] == "output" and list(sums)[-1] == "input"
    assert {"fc3", "fc1", "conv4", "conv1"} <= set(sums)
    for k, v in sums.items():
        torch.testing.assert_close(v, sums["output"], rtol=1e-8, atol=1e-10, msg=k)


def test_bias_absorbs_relevance_as_documented():
    torch.manual_seed(0)
    model = models.small_cnn().to(DT).eval()
    with torch.no_grad():
        model.fc2.bias.fill_(0.5)
    x = torch.rand(4, 1, 8, 8, dtype=DT)
    sums = xai.relevance_sums(model, x, composite="zero")
    logits = model(x).detach()
    pred = logits.argmax(1)
    # LRP-0 at fc2: sum_i R_i = z - b  (the bias keeps its share)
    torch.testing.assert_close(sums["fc2"], logits.gather(1, pred[:, None])[:, 0] - 0.5)


@pytest.mark.parametrize("composite", ["preset_a_flat", "epsilon_plus_flat", "epsilon", "zero"])
@pytest.mark.parametrize("arch", ["papernot_ccn", "resnet18"])
def test_batched_equals_per_sample(composite, arch, device):
    torch.manual_seed(0)
    if arch == "resnet18":
        model, x = _randomize_bn(models.resnet18(stem="mnist", width=0.0625)), torch.rand(3, 1, 16, 16)
    else:
        model, x = rnn.build_variant("CCN").model, torch.rand(3, 1, 28, 28)
    model, x = model.to(device, DT).eval(), x.to(device, DT)
    target = torch.tensor([1, 3, 7], device=device)
    batched = xai.lrp(model, x, target, composite=composite)
    single = torch.cat([xai.lrp(model, x[i:i + 1], target[i:i + 1], composite=composite) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-9, atol=1e-12 * float(single.abs().max()))


def _matrix_lrp_small_cnn(model, x, target, conv_rule, dense_eps, stab):
    """Independent whole-network LRP of small_cnn in matrix form (float64): flat on conv1,
    ``conv_rule`` ("zplus" / "alpha1beta0", identical on non-negative inputs) on conv2,
    epsilon on fc1/fc2, winner-take-all max-pool, pass-through ReLU."""
    out = []
    for n in range(x.shape[0]):
        a0 = x[n:n + 1]
        z1 = model.conv1(a0); a1 = torch.relu(z1)
        z2 = model.conv2(a1); a2 = torch.relu(z2)
        p, idx = F.max_pool2d(a2, 2, return_indices=True)
        f = p.flatten(1)
        z3 = model.fc1(f); a3 = torch.relu(z3)
        z4 = model.fc2(a3)
        R4 = torch.zeros_like(z4[0]); R4[target[n]] = z4[0, target[n]]
        W4 = model.fc2.weight
        R3 = (a3[0][None, :] * W4 * (R4 / _stab(z4[0], dense_eps))[:, None]).sum(0)
        W3 = model.fc1.weight
        Rf = (f[0][None, :] * W3 * (R3 / _stab(z3[0], dense_eps))[:, None]).sum(0)
        Rp = Rf.view_as(p)
        R2 = torch.zeros_like(a2).flatten(2)
        R2.scatter_(2, idx.flatten(2), Rp.flatten(2))
        R2 = R2.view_as(a2)[0].reshape(-1)
        M2 = _dense_matrix(model.conv2, a1.shape)
        Z = M2 * a1[0].reshape(-1)[None, :]
        zp = Z.clamp(min=0)
        bp = model.conv2.bias.clamp(min=0).repeat_interleave(64)
        R1 = (zp * (R2 / _stab(zp.sum(1) + bp, stab))[:, None]).sum(0)
        M1 = _dense_matrix(model.conv1, a0.shape)
        C = (M1 != 0).to(DT)
        R0 = (C * (R1 / _stab(C.sum(1), stab))[:, None]).sum(0)
        out.append(R0.view_as(a0))
    return torch.cat(out)


@pytest.mark.parametrize("composite,eps,stab", [("preset_a_flat", 0.1, 1e-7), ("epsilon_plus_flat", 1e-6, 1e-6)])
def test_composites_match_whole_network_matrix_reference(composite, eps, stab):
    torch.manual_seed(2)
    model = models.small_cnn().to(DT).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.weight.abs().min() == 0:
                m.weight.add_(1e-3)       # the flat reference reads connectivity from non-zero weights
    x = torch.rand(3, 1, 8, 8, dtype=DT)
    target = torch.tensor([0, 4, 9])
    got = xai.lrp(model, x, target, composite=composite, start="logit")
    with torch.no_grad():
        ref = _matrix_lrp_small_cnn(model, x, target, "zplus", eps, stab)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)


def test_first_layer_is_first_by_execution():
    """Shift runs before conv1 in the variants: conv1 still gets the first-layer (flat) rule."""
    model = rnn.build_variant("SM").model.to(DT).eval()
    x = torch.rand(2, 1, 28, 28, dtype=DT)
    ones_target = torch.tensor([3, 3])
    r = xai.lrp(model, x, ones_target, composite="preset_a_flat")
    # flat: the input relevance does not depend on the input values given the relevance above conv1
    comp = Composite([(CONV_TYPES, rules.AlphaBeta(1, 0, 1e-7)), (DENSE_TYPES, rules.Epsilon(0.1))],
                     first_map=[(LINEAR_TYPES, rules.Flat(1e-7))], stabilizer=1e-7)
    torch.testing.assert_close(r, xai.lrp(model, x, ones_target, composite=comp))
    comp_no_first = Composite([(CONV_TYPES, rules.AlphaBeta(1, 0, 1e-7)), (DENSE_TYPES, rules.Epsilon(0.1))])
    assert not torch.allclose(r, xai.lrp(model, x, ones_target, composite=comp_no_first))


def test_compact_model_lrp_runs_and_conserves_through_compact_layers():
    torch.manual_seed(0)
    model = rnn.compactify(_bias_free(models.papernot_mnist())).to(DT).eval()
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    x = torch.rand(2, 1, 28, 28, dtype=DT)
    comp = Composite([(LINEAR_TYPES, rules.ZPlus(stabilizer=1e-12))], first_map=[(LINEAR_TYPES, rules.Flat(1e-12))])
    sums = xai.relevance_sums(model, x, composite=comp)
    for k, v in sums.items():
        torch.testing.assert_close(v, sums["output"], rtol=1e-8, atol=1e-10, msg=k)
    with pytest.raises(xai.UnsupportedLayerError, match="CompactAsLinear"):
        xai.lrp(model, x, composite="epsilon", canonizers=[])


# ----------------------------------------------------------------------------------------------
# restoration and bad input
# ----------------------------------------------------------------------------------------------
class Weird(nn.Module):
    def forward(self, x):
        return x * 2


def test_unsupported_layer_names_module_and_fix_and_restores():
    model = nn.Sequential(nn.Linear(4, 6), Weird(), nn.ReLU(), nn.Linear(6, 3)).to(DT).train()
    model[3].weight.requires_grad_(False)
    before = _state(model)
    x = torch.rand(5, 4, dtype=DT)
    with pytest.raises(xai.UnsupportedLayerError, match=r"'1' \(Weird\).*register_rule\(Weird"):
        xai.lrp(model, x)
    _assert_untouched(model, before)
    xai.register_rule(Weird, rules.Pass())
    try:
        r = xai.lrp(model, x, composite="zero")
        torch.testing.assert_close(r, _grad_x_input(model.eval(), x, model(x).argmax(1)), rtol=1e-9, atol=1e-12)
        model.train()
    finally:
        xai.unregister_rule(Weird)
    _assert_untouched(model, before)


def test_restored_when_forward_raises_inside_canonized_resnet():
    model = models.resnet18(stem="mnist", width=0.125).train()
    before = _state(model)
    with pytest.raises(RuntimeError):
        xai.lrp(model, torch.rand(2, 3, 28, 28))     # wrong channel count: conv1 raises mid-call
    _assert_untouched(model, before)
    r = xai.lrp(model, torch.rand(2, 1, 28, 28))
    assert torch.isfinite(r).all()
    _assert_untouched(model, before)


def test_inplace_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(36, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(DT)
    x = torch.rand(3, 1, 8, 8, dtype=DT)
    r = xai.lrp(model, x, composite="zero")
    torch.testing.assert_close(r, _grad_x_input(model, x, model(x).argmax(1)), rtol=1e-9, atol=1e-12)


class ClobberInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        y = self.b(h)
        h.mul_(0)          # overwrites b's input after b ran
        return y


def test_input_overwritten_in_place_is_refused():
    model = ClobberInput()
    with pytest.raises(RuntimeError, match="'b' was modified in place"):
        xai.lrp(model, torch.rand(3, 4), composite="epsilon")
    assert all(not m._forward_hooks for m in model.modules())


def test_shared_module_refused_unless_rule_allows():
    lin = nn.Linear(5, 5)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(5, 3)).to(DT)
    x = torch.rand(3, 5, dtype=DT)
    with pytest.raises(xai.SharedModuleError, match="runs 2 times"):
        xai.lrp(model, x, composite="zero")
    _assert_untouched(model, _state(model))
    comp = Composite([(LINEAR_TYPES, rules.Zero(allow_reuse=True))], stabilizer=0.0)
    r = xai.lrp(model, x, composite=comp)
    torch.testing.assert_close(r, _grad_x_input(model, x, model(x).argmax(1)), rtol=1e-9, atol=1e-12)


def test_bad_input_errors():
    model = models.small_cnn()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="target=10 is out of range"):
        xai.lrp(model, x, 10)
    with pytest.raises(ValueError, match="0..9"):
        xai.lrp(model, x, torch.tensor([1, 12]))
    with pytest.raises(TypeError, match="integer"):
        xai.lrp(model, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="must be a batch"):
        xai.lrp(model, torch.rand(8))
    with pytest.raises(TypeError, match="floating"):
        xai.lrp(model, torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        xai.lrp(model, torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="unknown composite 'nope'"):
        xai.lrp(model, x, composite="nope")
    with pytest.raises(ValueError, match="start must be"):
        xai.lrp(model, x, start="softmax")
    with pytest.raises(ValueError, match="alpha - beta"):
        rules.AlphaBeta(2.0, 2.0)
    with pytest.raises(xai.LayerNotFoundError, match="no layer named 'conv9'"):
        xai.lrp_signatures(model, x, layer="conv9")
    with pytest.raises(TypeError):
        xai.register_rule(Weird, "pass")


def test_inference_mode_caller_and_model_copy_untouched():
    model = models.small_cnn().eval()
    x = torch.rand(3, 1, 8, 8)
    ref = xai.lrp(model, x)
    with torch.inference_mode():
        got = xai.lrp(model, x)
    torch.testing.assert_close(got, ref)


def test_explain_pair_aligned_targets():
    torch.manual_seed(0)
    model = models.small_cnn().eval()
    x = torch.rand(4, 1, 8, 8)
    x_adv = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    pair = xai.explain_pair(model, x, x_adv)
    pred = model(x).argmax(1)
    assert torch.equal(pair.target_clean, pred) and torch.equal(pair.target_adv, pred)
    torch.testing.assert_close(pair.clean, xai.lrp(model, x, pred))
    torch.testing.assert_close(pair.adv, xai.lrp(model, x_adv, pred))
    torch.testing.assert_close(pair.diff, pair.adv - pair.clean)
    assert torch.equal(pair.success, pair.pred_clean != pair.pred_adv)
    own = xai.explain_pair(model, x, x_adv, target="own")
    assert torch.equal(own.target_adv, model(x_adv).argmax(1))
    cam = xai.explain_pair(model, x, x_adv, method="gradcam", layer="conv2")
    assert cam.clean.shape == (4, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        xai.explain_pair(model, x, x_adv[:2])


def test_concurrent_calls_on_one_model_agree():
    import threading
    torch.manual_seed(0)
    model = _randomize_bn(models.resnet18(stem="mnist", width=0.0625)).eval()
    xs = [torch.rand(2, 1, 16, 16) for _ in range(4)]
    ref = [xai.lrp(model, x, composite="epsilon_plus_flat") for x in xs]
    out = [None] * 4

    def work(i):
        out[i] = xai.lrp(model, xs[i], composite="epsilon_plus_flat")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())
