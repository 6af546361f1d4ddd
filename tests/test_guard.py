"""frozen_model restores modes, requires_grad and .grad; input_gradient leaves parameters alone."""
import pytest
import torch
from torch import nn

from robustops._guard import frozen_model, model_device
from robustops.attacks.gradients import input_gradient


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_restores_modes_requires_grad_and_grads():
    m = _model()
    m.train()
    m[1].eval()  # mixed modes must come back exactly
    m[0].weight.requires_grad_(False)
    g = torch.ones_like(m[3].weight)
    m[3].weight.grad = g
    with frozen_model(m):
        assert not m.training and not m[1].training
        assert not any(p.requires_grad for p in m.parameters())
        grad, logits = input_gradient(m, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        assert grad.shape == (5, 4) and logits.shape == (5, 3)
    assert m.training and not m[1].training and m[2].training
    assert not m[0].weight.requires_grad and m[3].weight.requires_grad
    assert m[3].weight.grad is g and m[0].bias.grad is None


def test_freeze_params_false_keeps_flags_and_nests_with_a_freezing_guard():
    """freeze_params=False (blocks under no_grad): eval mode, requires_grad untouched; a freezing
    guard nested inside freezes, and the last exit restores the first entrant's snapshot."""
    m = _model().train()
    m[0].weight.requires_grad_(False)
    with frozen_model(m, freeze_params=False):
        assert not m.training
        assert not m[0].weight.requires_grad and m[3].weight.requires_grad
        with frozen_model(m):
            assert not any(p.requires_grad for p in m.parameters())
        assert not any(p.requires_grad for p in m.parameters())       # restored only by the last exit
    assert m.training and not m[0].weight.requires_grad and m[3].weight.requires_grad


def test_restores_on_exception():
    m = _model().train()
    with pytest.raises(RuntimeError):
        with frozen_model(m):
            raise RuntimeError("boom")
    assert m.training and all(p.requires_grad for p in m.parameters())


def test_input_gradient_matches_autograd_and_targeted_sign():
    m = _model().eval()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(m(xr), y, reduction="sum").backward()
    grad, _ = input_gradient(m, x, y)
    torch.testing.assert_close(grad, xr.grad)
    grad_t, _ = input_gradient(m, x, y, targeted=True)
    torch.testing.assert_close(grad_t, -xr.grad)


def test_guard_type_error_and_device():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        with frozen_model(object()):
            pass
    assert model_device(nn.ReLU()) == torch.device("cpu")
