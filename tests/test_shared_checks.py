"""The shared check layer (robustops._checks, robustops._gradients, robustops._guard)."""
import threading

import pytest
import torch
from torch import nn

from robustops import attacks
from robustops._checks import SelectOutput, as_logits, check_labels
from robustops._gradients import InferenceModeError, input_gradient, sanitize_gradient
from robustops._guard import frozen_model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x):
        z = self.net(x)
        return z, z.softmax(1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_labels_any_integer_dtype(dtype):
    y = check_labels(torch.tensor([0, 3, 9], dtype=dtype), 3, num_classes=10)
    assert y.dtype == torch.int64 and y.tolist() == [0, 3, 9]


@pytest.mark.parametrize("y,err", [(torch.tensor([0.0, 1.0]), TypeError), (torch.tensor([True, False]), TypeError),
                                   (torch.tensor([0, 10]), ValueError), (torch.tensor([-1, 0]), ValueError),
                                   ([0, 1], TypeError)])
def test_labels_rejected(y, err):
    with pytest.raises(err, match="y"):
        check_labels(y, 2, num_classes=10)


def test_as_logits_rule():
    z = torch.randn(4, 3)
    assert as_logits(z, 4) is z
    assert as_logits({"logits": z}, 4) is z
    with pytest.raises(ValueError, match="tuple of 2 items.*SelectOutput"):
        as_logits((z, z), 4)
    with pytest.raises(ValueError, match="dict"):
        as_logits({"out": z}, 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        as_logits(torch.full((4, 3), float("nan")), 4)
    with pytest.raises(ValueError, match="shape"):
        as_logits(torch.randn(4), 4)


def test_select_output_makes_tuple_model_attackable():
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="tuple"):
        attacks.fgsm(_Pair(), x, None, 0.1)
    m = _Pair()
    out = attacks.fgsm(SelectOutput(m, 0), x, None, 0.1)
    ref = attacks.fgsm(m.net, x, None, 0.1)
    assert torch.equal(out, ref)


def test_gradient_under_inference_mode_equals_plain():
    net, x, y = _net(), torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    ref = attacks.fgsm(net, x, y, 0.1)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        out = attacks.fgsm(net, xi, yi, 0.1)
        g, _ = input_gradient(net, xi, yi)
    assert torch.equal(out, ref)
    assert torch.equal(g, input_gradient(net, x, y)[0])


def test_inference_tensor_parameters_named_error():
    with torch.inference_mode():
        net = _net()
    with pytest.raises(InferenceModeError, match="inference_mode"):
        input_gradient(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))


def test_sanitize_gradient_limit_direction():
    g = torch.tensor([[1.0, float("inf"), -2.0], [float("nan"), 3.0, 0.5], [1.0, 2.0, 3.0]])
    s = sanitize_gradient(g)
    assert torch.equal(s, torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 0.5], [1.0, 2.0, 3.0]]))


def test_guard_threads_restore_state():
    net = _net().train()
    for p in net.parameters():
        p.requires_grad_(True)
    x = torch.rand(64, 1, 8, 8)
    errors = []

    def work():
        try:
            for _ in range(20):
                attacks.PGD(net, eps=0.1, alpha=0.02, steps=3)(x)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert net.training and all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


def test_guard_nested_restores_once():
    net = _net().train()
    with frozen_model(net):
        with frozen_model(net):
            assert not net.training
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.training and all(p.requires_grad for p in net.parameters())


def test_guard_threads_mixed_attacks_same_results():
    # different attacks on one model at once: each result equals its sequential run and the
    # user's state (train mode, requires_grad, .grad) comes back once the last one is out
    net = _net().train()
    marker = torch.ones_like(net[1].weight)
    net[1].weight.grad = marker
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    jobs = {
        "pgd": lambda: attacks.PGD(net, eps=0.1, alpha=0.02, steps=3, seed=0)(x, y),
        "deepfool": lambda: attacks.DeepFool(net, 10)(x, y).x_adv,
        "cw": lambda: attacks.CWL2(net, c=1.0, steps=10, binary_search_steps=2)(x, y),
        "jsma": lambda: attacks.JSMA(net, gamma=0.1)(x, (y + 1) % 10),
        "curve": lambda: attacks.robust_accuracy_curve(net, (x, y), [0.0, 0.1]),
    }
    ref = {k: f() for k, f in jobs.items()}
    assert net.training
    out, errors = {}, []

    def work(k):
        try:
            for _ in range(3):
                out[k] = jobs[k]()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in jobs:
        assert torch.equal(out[k], ref[k]), k
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert net[1].weight.grad is marker
