"""robustops.nn: compact layers, L2-softmax head, bounded ReLU, label smoothing, compactify,
the paper's variants, state_dict round trips and torch.compile(fullgraph=True)."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustops.nn as rnn
from robustops.nn import (
    BoundedReLU,
    CompactConv2d,
    CompactLinear,
    L2SoftmaxLinear,
    LabelSmoothingCrossEntropy,
    build_variant,
    compactify,
    l2softmax_alpha_lower_bound,
    smooth_labels,
)


def conv_reference(x, w, b, stride, padding, dilation, groups, alpha, delta):
    u = F.conv2d(x, w, None, stride, padding, dilation, groups)
    n, c, h, wd = x.shape
    q = (x * x).reshape(n, groups, c // groups, h, wd).sum(2)
    ones = torch.ones(groups, 1, w.shape[2], w.shape[3], dtype=x.dtype)
    s = F.conv2d(q, ones, None, stride, padding, dilation, groups)
    y = alpha * u / (s.sqrt() + delta).repeat_interleave(w.shape[0] // groups, 1)
    return y if b is None else y + b.view(1, -1, 1, 1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_compact_conv2d_module_matches_formula():
    m = CompactConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, alpha=1.5, delta=0.02).double()
    assert isinstance(m.alpha, nn.Parameter) and m.alpha.shape == () and float(m.alpha.detach()) == 1.5
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias", "alpha"]
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(y, conv_reference(x, m.weight, m.bias, 2, 1, 1, 2, m.alpha, 0.02))
    y.sum().backward()
    assert m.weight.grad is not None and m.bias.grad is not None and m.alpha.grad is not None
    assert m(x[0]).shape == (6, 5, 5)  # unbatched


def test_compact_conv2d_padding_modes():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    m = CompactConv2d(3, 4, 3, padding=1, padding_mode="reflect").double()
    xr = F.pad(x, (1, 1, 1, 1), mode="reflect")
    torch.testing.assert_close(m(x), conv_reference(xr, m.weight, m.bias, 1, 0, 1, 1, 1.0, 0.01))
    m = CompactConv2d(3, 4, (3, 4), padding="same").double()  # asymmetric 'same' for the even kernel
    xs = F.pad(x, (1, 2, 1, 1))
    assert m(x).shape == (2, 4, 8, 8)
    torch.testing.assert_close(m(x), conv_reference(xs, m.weight, m.bias, 1, 0, 1, 1, 1.0, 0.01))
    m = CompactConv2d(3, 4, 3, padding="valid", bias=False).double()
    torch.testing.assert_close(m(x), conv_reference(x, m.weight, None, 1, 0, 1, 1, 1.0, 0.01))


def test_compact_linear_and_fixed_alpha():
    m = CompactLinear(5, 3, alpha=2.0, learn_alpha=False).double()
    assert "alpha" in dict(m.named_buffers()) and "alpha" not in dict(m.named_parameters())
    x = torch.randn(4, 5, dtype=torch.float64)
    ref = 2.0 * x @ m.weight.T / (x.norm(dim=1, keepdim=True) + 0.01) + m.bias
    torch.testing.assert_close(m(x), ref)


def test_l2softmax_linear_and_lower_bound():
    m = L2SoftmaxLinear(6, 4, alpha=8.0).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), F.linear(8.0 * x / (x.norm(dim=1, keepdim=True) + 1e-6), m.weight, m.bias))
    assert not isinstance(m.alpha, nn.Parameter)
    assert isinstance(L2SoftmaxLinear(6, 4, learn_alpha=True).alpha, nn.Parameter)
    assert math.isclose(l2softmax_alpha_lower_bound(10, 0.9), math.log(72.0))
    assert math.isclose(l2softmax_alpha_lower_bound(1000, 0.9), math.log(0.9 * 998 / 0.1))
    with pytest.raises(ValueError, match="num_classes"):
        l2softmax_alpha_lower_bound(2)
    with pytest.raises(ValueError, match="p must"):
        l2softmax_alpha_lower_bound(10, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        L2SoftmaxLinear(6, 4, alpha=-1.0)


def test_bounded_relu():
    x = torch.tensor([-2.0, -0.0, 0.3, 0.99, 1.0, 5.0])
    assert torch.equal(BoundedReLU()(x), torch.tensor([0.0, 0.0, 0.3, 0.99, 1.0, 1.0]))
    assert torch.equal(BoundedReLU(6.0)(x), torch.clamp(x, 0, 6))
    with pytest.raises(ValueError, match="max_value"):
        BoundedReLU(0.0)


def test_label_smoothing():
    y = torch.tensor([3, 0])
    soft = smooth_labels(y, 10, 0.1)
    assert torch.allclose(soft[0, 3], torch.tensor(0.9)) and torch.allclose(soft[0, 0], torch.tensor(1 / 90))
    torch.testing.assert_close(soft.sum(1), torch.ones(2))
    logits = torch.randn(2, 10)
    loss = LabelSmoothingCrossEntropy(0.1)(logits, y)
    torch.testing.assert_close(loss, -(soft * logits.log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(LabelSmoothingCrossEntropy(0.0)(logits, y), F.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="smoothing"):
        LabelSmoothingCrossEntropy(1.0)


def test_state_dict_round_trip():
    m = nn.Sequential(CompactConv2d(1, 4, 3, alpha=2.0), nn.ReLU(), nn.Flatten(), CompactLinear(4 * 6 * 6, 3),
                      L2SoftmaxLinear(3, 2, alpha=5.0))
    with torch.no_grad():
        m[0].alpha.fill_(3.25)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert {"0.alpha", "3.alpha", "4.alpha", "0.weight", "0.bias"} <= set(sd)
    m2 = nn.Sequential(CompactConv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), CompactLinear(4 * 6 * 6, 3),
                       L2SoftmaxLinear(3, 2))
    m2.load_state_dict(sd)
    x = torch.rand(2, 1, 8, 8)
    assert float(m2[0].alpha.detach()) == 3.25
    torch.testing.assert_close(m2(x), m(x))


def test_compactify():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Sequential(nn.Linear(4 * 5 * 5, 6), nn.ReLU()), nn.Linear(6, 3))
    before = [p.clone() for p in model.parameters()]
    new = compactify(model, alpha=1.5, delta=0.05)
    assert type(model[0]) is nn.Conv2d  # original left alone
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert isinstance(new[0], CompactConv2d) and isinstance(new[3][0], CompactLinear)
    assert isinstance(new[4], CompactLinear)
    assert new[0].groups == 2 and new[0].padding == (1, 1) and new[0].delta == 0.05
    torch.testing.assert_close(new[0].weight, model[0].weight)
    torch.testing.assert_close(new[4].bias, model[4].bias)
    assert float(new[4].alpha.detach()) == 1.5
    x = torch.rand(2, 2, 5, 5)
    y = new[0](x)
    torch.testing.assert_close(y, conv_reference(x, model[0].weight, model[0].bias, 1, 1, 1, 2, 1.5, 0.05))
    only_conv = compactify(model, linear=False)
    assert isinstance(only_conv[0], CompactConv2d) and type(only_conv[4]) is nn.Linear
    assert isinstance(compactify(nn.Linear(3, 2)), CompactLinear)
    same = compactify(new)
    assert isinstance(same[0], CompactConv2d)
    with pytest.raises(TypeError, match="model"):
        compactify("not a model")


def test_variants():
    x = torch.rand(2, 1, 28, 28)
    for name in rnn.VARIANTS:
        v = build_variant(name)
        assert v.name == name
        assert v.model(x).shape == (2, 10)
        mods = list(v.model.modules())
        has = lambda t: any(isinstance(m, t) for m in mods)  # noqa: E731
        assert has(CompactConv2d) == (name in ("CCN", "CCN+LS"))
        assert has(BoundedReLU) == (name == "BReLU")
        assert has(L2SoftmaxLinear) == (name == "L2SM")
        assert v.criterion.smoothing == (0.1 if name in ("LS", "CCN+LS") else 0.0)
        if name.startswith("CCN"):
            assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in mods)
    assert build_variant("ccn+ls").name == "CCN+LS"
    with pytest.raises(ValueError, match="unknown variant"):
        build_variant("XYZ")
    assert build_variant("SM", in_channels=3, image_size=32).model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_module_bad_input():
    with pytest.raises(ValueError, match="delta"):
        CompactConv2d(3, 4, 3, delta=-0.01)
    with pytest.raises(ValueError, match="alpha"):
        CompactConv2d(3, 4, 3, alpha=float("inf"))
    with pytest.raises(ValueError, match="alpha"):
        CompactLinear(3, 4, alpha=float("nan"))
    with pytest.raises(TypeError, match="alpha"):
        CompactLinear(3, 4, alpha="big")
    m = CompactConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="3 input channels"):
        m(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="in_features=3"):
        CompactLinear(3, 4)(torch.rand(2, 5))
    with torch.no_grad():
        m.alpha.fill_(float("nan"))  # a learnable alpha that went non-finite is caught by the op
    with pytest.raises(RuntimeError, match="alpha must be finite"):
        m(torch.rand(1, 3, 8, 8))


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    v = build_variant("CCN+LS")
    x = torch.rand(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(v.model.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        loss = v.criterion(v.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in v.model.parameters())


def test_torch_compile_fullgraph():
    """fullgraph compile of a small compact model, forward and backward. Uses backend="aot_eager"
    (traces through the fake kernels and the registered autograd; inductor's C++ compile of the
    surrounding graph is too slow on the 2-core CI machine)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        CompactConv2d(1, 4, 3, padding=1, alpha=2.0), nn.ReLU(), nn.MaxPool2d(2),
        CompactConv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Flatten(),
        CompactLinear(8 * 2 * 2, 6), BoundedReLU(), L2SoftmaxLinear(6, 3, alpha=4.0),
    ).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_eager = model(x)
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    g_eager = [p.grad for p in model.parameters()]
    y_comp = compiled(x)
    (gx_comp,) = torch.autograd.grad(y_comp.sum(), x)
    torch.testing.assert_close(y_comp, y_eager)
    torch.testing.assert_close(gx_comp, gx_eager)
    model.zero_grad()
    compiled(x).sum().backward()
    assert model[0].alpha.grad is not None and torch.isfinite(model[0].alpha.grad)
    del g_eager


# --------------------------------------------------------------------------------------------
# compactify: what carries over (issue 9.7)
# --------------------------------------------------------------------------------------------
def test_compactify_copies_every_requires_grad():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    model[0].bias.requires_grad_(False)        # frozen bias
    model[3].weight.requires_grad_(False)      # frozen weight, trainable bias
    new = compactify(model)
    assert new[0].weight.requires_grad and not new[0].bias.requires_grad
    assert not new[3].weight.requires_grad and new[3].bias.requires_grad
    assert model[0].bias.requires_grad is False  # the original is untouched


def test_compactify_converts_shared_modules_once():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    head = nn.Linear(3 * 4 * 4, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Sequential(nn.Flatten(), head))
    model.extra = nn.Sequential(head)  # the head is reachable from two parents
    new = compactify(model)
    assert new[0] is new[2] and isinstance(new[0], CompactConv2d)
    assert new[4][1] is new.extra[0] and isinstance(new.extra[0], CompactLinear)
    # parameters: the original's plus one alpha per unique converted layer (not one copy per use)
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in model.parameters()) + 2
    x = torch.rand(2, 3, 4, 4)
    ref = compactify(shared)(x)
    torch.testing.assert_close(new[2](new[0](x)), compactify(shared)(ref))


def test_compactify_keeps_hooks():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    calls = []
    model[0].register_forward_pre_hook(lambda m, inp: calls.append(("pre", type(m).__name__)))
    model[0].register_forward_hook(lambda m, inp, out: calls.append(("fwd", type(m).__name__)))
    model[2].register_forward_hook(lambda m, inp, out: out * 2)  # a hook that changes the output
    model[2].register_full_backward_hook(lambda m, gin, gout: calls.append(("bwd", type(m).__name__)))
    new = compactify(model)
    x = torch.rand(2, 1, 5, 5)
    out = new(x)
    plain = new[2].forward(new[1](new[0].forward(x)))
    torch.testing.assert_close(out, plain * 2)
    out.sum().backward()
    assert calls == [("pre", "CompactConv2d"), ("fwd", "CompactConv2d"), ("bwd", "CompactLinear")]


def test_compactify_subclasses_warn_or_convert():
    class MyConv(nn.Conv2d):
        pass

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyConv(1, 2, 3), nn.Flatten(), MyLinear(18, 3))
    with pytest.warns(UserWarning) as rec:
        new = compactify(model)
    messages = [str(r.message) for r in rec]
    assert any("MyConv is a subclass of nn.Conv2d" in m for m in messages)
    assert any("MyLinear is a subclass of nn.Linear" in m for m in messages)
    assert type(new[0]) is MyConv and type(new[2]) is MyLinear
    converted = compactify(model, subclasses=True)
    assert isinstance(converted[0], CompactConv2d) and isinstance(converted[2], CompactLinear)
    torch.testing.assert_close(converted[0].weight, model[0].weight)


def test_compactify_weight_normed_convs():
    from torch.nn.utils.parametrizations import weight_norm
    from torch.nn.utils import parametrize

    conv = weight_norm(nn.Conv2d(2, 3, 3))
    with torch.no_grad():
        conv.parametrizations.weight.original1.mul_(3.0)  # v not unit-norm: g and v both matter
    new = compactify(nn.Sequential(conv))[0]
    assert isinstance(new, CompactConv2d) and parametrize.is_parametrized(new, "weight")
    torch.testing.assert_close(new.parametrizations.weight.original0, conv.parametrizations.weight.original0)
    torch.testing.assert_close(new.parametrizations.weight.original1, conv.parametrizations.weight.original1)
    x = torch.rand(2, 2, 5, 5)
    torch.testing.assert_close(new(x), conv_reference(x, conv.weight, conv.bias, 1, 0, 1, 1, 1.0, 0.01))
    new(x).sum().backward()
    assert new.parametrizations.weight.original0.grad is not None  # g and v stay the trained tensors

    with pytest.warns(FutureWarning):
        legacy = torch.nn.utils.weight_norm(nn.Conv2d(2, 3, 3))
    new2 = compactify(nn.Sequential(legacy))[0]
    assert isinstance(new2, CompactConv2d)
    torch.testing.assert_close(new2.weight_g, legacy.weight_g)
    torch.testing.assert_close(new2.weight_v, legacy.weight_v)
    torch.testing.assert_close(new2(x), conv_reference(x, legacy.weight, legacy.bias, 1, 0, 1, 1, 1.0, 0.01))
    assert "weight" in legacy.__dict__  # the original's computed weight is back in place


def test_compactify_warns_on_inplace_consumer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(18, 3),
                          nn.ReLU(inplace=True))
    with pytest.warns(UserWarning, match=r"0 -> 1.*3 -> 4"):
        new = compactify(model)
    x = torch.rand(2, 1, 5, 5)
    with pytest.raises(RuntimeError, match="inplace"):
        new(x).sum().backward()  # what the warning announces
    with pytest.raises(ValueError, match="modified in place"):
        compactify(model, inplace_ops="raise")
    fixed = compactify(model, inplace_ops="fix")
    assert not fixed[1].inplace and not fixed[4].inplace and model[1].inplace
    fixed(x).sum().backward()
    assert fixed[0].weight.grad is not None

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, z):
            return torch.relu_(self.conv(z)).flatten(1)

    with pytest.warns(UserWarning, match="conv -> "):
        compactify(Functional())


def test_cifar_variants():
    x = torch.rand(2, 3, 32, 32)
    from robustops.models import Normalize

    for name in rnn.VARIANTS:
        v = build_variant(name, dataset="cifar10")
        assert v.name == name and v.model(x).shape == (2, 10)
        mods = list(v.model.modules())
        convs = [m for m in mods if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]  # VGG11, Table 10
        assert v.model.fc1.out_features == 512 and v.model.fc2.out_features == 512
        assert isinstance(v.model.normalize, Normalize)
        torch.testing.assert_close(v.model.normalize.mean.flatten(), torch.full((3,), 0.5))
        has = lambda t: any(isinstance(m, t) for m in mods)  # noqa: E731
        assert has(CompactConv2d) == (name in ("CCN", "CCN+LS"))
        assert has(BoundedReLU) == (name == "BReLU")
        assert has(L2SoftmaxLinear) == (name == "L2SM")
        assert v.criterion.smoothing == (0.1 if name in ("LS", "CCN+LS") else 0.0)
        if name.startswith("CCN"):
            assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in mods)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_variant("SM", dataset="svhn")
    assert build_variant("SM").model(torch.rand(1, 1, 28, 28)).shape == (1, 10)  # mnist stays the default
