"""robustops.xai.gradcam: the Grad-CAM formula, per-neuron selection, errors, restoration."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustops import models, xai


def _manual(model, x, layer, target):
    """Grad-CAM by hand: split the model at ``layer`` (a Sequential child)."""
    names = [n for n, _ in model.named_children()]
    k = names.index(layer) + 1
    children = list(model.children())
    head, tail = nn.Sequential(*children[:k]), nn.Sequential(*children[k:])
    a = head(x).detach().requires_grad_(True)
    out = tail(a)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), a)
    return a.detach(), g


def test_gradcam_formula_and_channels(device):
    torch.manual_seed(0)
    model = models.papernot_mnist().to(device).eval()
    x = torch.rand(3, 1, 28, 28, device=device)
    target = torch.tensor([2, 5, 5], device=device)
    a, g = _manual(model, x, "conv4", target)
    alpha = g.mean((2, 3))
    ref = torch.relu((alpha[:, :, None, None] * a).sum(1))
    got = xai.gradcam(model, x, "conv4", target, upsample=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    up = xai.gradcam(model, x, model.conv4, target)
    assert up.shape == (3, 28, 28) and bool((up >= 0).all())
    torch.testing.assert_close(up, F.interpolate(ref[:, None], (28, 28), mode="bilinear",
                                                 align_corners=False)[:, 0].clamp_min(0), rtol=1e-5, atol=1e-6)
    # one neuron = the other channels' weights set to zero (Granda et al., Sec. 5.3)
    for ch in (0, [3, 7, 11], torch.tensor([1, 2])):
        idx = torch.as_tensor(ch).flatten()
        mask = torch.zeros(64, device=device)
        mask[idx] = 1
        ref_ch = torch.relu(((alpha * mask)[:, :, None, None] * a).sum(1))
        torch.testing.assert_close(xai.gradcam(model, x, "conv4", target, channels=ch, upsample=False), ref_ch,
                                   rtol=1e-5, atol=1e-6)
    boolmask = torch.zeros(64, dtype=torch.bool)
    boolmask[[3, 7]] = True
    torch.testing.assert_close(xai.gradcam(model, x, "conv4", target, channels=boolmask),
                               xai.gradcam(model, x, "conv4", target, channels=[3, 7]))
    # default target: the prediction; batching changes nothing
    pred = model(x).argmax(1)
    torch.testing.assert_close(xai.gradcam(model, x, "conv2"), xai.gradcam(model, x, "conv2", pred))
    torch.testing.assert_close(xai.gradcam(model, x, "conv2"),
                               torch.cat([xai.gradcam(model, x[i:i + 1], "conv2") for i in range(3)]),
                               rtol=1e-5, atol=1e-6)


def test_gradcam_normalisation_and_magnitude():
    torch.manual_seed(0)
    model = models.small_cnn().eval()
    x = torch.rand(4, 1, 8, 8)
    raw = xai.gradcam(model, x, "conv2")
    mm = xai.gradcam(model, x, "conv2", normalize="minmax")
    flat = raw.flatten(1)
    ref = (raw - flat.min(1).values[:, None, None]) / (flat.max(1).values - flat.min(1).values + 1e-7)[:, None, None]
    torch.testing.assert_close(mm, ref)
    mx = xai.gradcam(model, x, "conv2", normalize="max")
    torch.testing.assert_close(mx, raw / (flat.max(1).values[:, None, None] + 1e-7))
    assert float(raw.max()) > 0 and not torch.allclose(raw.amax((1, 2)), torch.ones(4))


def test_gradcam_resnet_block_and_restore():
    model = models.resnet18(stem="mnist", width=0.125).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cam = xai.gradcam(model, torch.rand(2, 1, 28, 28), "layer3.1", target=4, channels=[0, 5])
    assert cam.shape == (2, 28, 28)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not m._forward_hooks for m in model.modules())


def test_gradcam_errors():
    model = models.small_cnn()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(xai.LayerNotFoundError, match="conv7"):
        xai.gradcam(model, x, "conv7")
    with pytest.raises(ValueError, match=r"\[N, K, h, w\]"):
        xai.gradcam(model, x, "fc1")
    with pytest.raises(ValueError, match=r"channels must be in \[0, 32\)"):
        xai.gradcam(model, x, "conv2", channels=[40])
    with pytest.raises(ValueError, match="out of range"):
        xai.gradcam(model, x, "conv2", target=11)
    with pytest.raises(ValueError, match="normalize"):
        xai.gradcam(model, x, "conv2", normalize="softmax")
    with pytest.raises(ValueError, match="batch"):
        xai.gradcam(model, torch.rand(8), "conv2")
    act = nn.ReLU()
    shared = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), act, nn.Conv2d(2, 2, 3, padding=1), act, nn.Flatten(),
                           nn.Linear(128, 3))
    with pytest.raises(xai.SharedModuleError, match="runs 2 times"):
        xai.gradcam(shared, x, act)
    assert all(not m._forward_hooks for m in shared.modules())
