"""robustops.xai against its peers: Zennit 1.0 (``EpsilonPlusFlat``) and pytorch-grad-cam (``GradCAM``).

Both are optional test peers (the ``xai-peers`` extra); each test skips when its peer is absent.
Neither imports without torchvision, which does not install beside the CPU torch used here:
:mod:`robustops.xai._peers` supplies a stand-in for the few torchvision names they import.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from robustops import models, xai
from robustops import nn as rnn
from robustops.xai._peers import import_gradcam, import_zennit, zennit_epsilon_plus_flat


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


_CACHE = {}


def _trained_small_cnn():
    if "small" in _CACHE:
        return _CACHE["small"]
    from robustops import data
    x, y = data.as_tensors(data.load("digits", split="train"))
    model = models.small_cnn()
    models.train(model, (x[:400], y[:400]), epochs=2, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    _CACHE["small"] = (model.eval(), x[400:416])
    return _CACHE["small"]


@pytest.mark.parametrize("arch", ["small_cnn_trained", "papernot_variant", "resnet18", "resnet50_imagenet_stem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_epsilon_plus_flat_equals_zennit(arch, dtype):
    if import_zennit() is None:
        pytest.skip("zennit is not installed (pip install 'robustops[xai-peers]')")
    torch.manual_seed(0)
    if arch == "small_cnn_trained":
        model, x = _trained_small_cnn()
        model = copy.deepcopy(model)
    elif arch == "papernot_variant":
        model, x = rnn.build_variant("SM").model, torch.rand(4, 1, 28, 28)
    elif arch == "resnet18":
        model, x = _randomize_bn(models.resnet18(stem="mnist", width=0.25)), torch.rand(3, 1, 28, 28)
    else:
        model, x = _randomize_bn(models.resnet50(3, stem="imagenet", width=0.125)), torch.rand(2, 3, 48, 48)
    model, x = model.to(dtype).eval(), x.to(dtype)
    target = model(x).argmax(1)
    ours = xai.lrp(model, x, target, composite="epsilon_plus_flat", start="one_hot")
    ref = zennit_epsilon_plus_flat(model, x, target)
    rel = float((ours - ref).abs().max() / ref.abs().max())
    assert rel <= (1e-4 if dtype == torch.float32 else 1e-10), rel
    # the start convention: "logit" scales every sample's map by its logit
    logit = model(x).detach().gather(1, target[:, None]).view(-1, *([1] * (x.dim() - 1)))
    torch.testing.assert_close(xai.lrp(model, x, target, composite="epsilon_plus_flat"), ours * logit,
                               rtol=1e-4, atol=1e-4 * float((ours * logit).abs().max()))


def _grad_cam_reference(model, layer, x, targets):
    pgc = import_gradcam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with pgc.GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


@pytest.mark.parametrize("layer_name", ["conv2", "conv1"])
def test_gradcam_equals_pytorch_grad_cam_same_resolution(layer_name):
    if import_gradcam() is None:
        pytest.skip("grad-cam is not installed (pip install 'robustops[xai-peers]')")
    model, x = _trained_small_cnn()       # conv1/conv2 keep the 8x8 input size: no resizing involved
    targets = model(x).argmax(1)
    ref = _grad_cam_reference(model, getattr(model, layer_name), x, targets)
    ours = xai.gradcam(model, x, layer_name, targets, normalize="minmax")
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-4)   # theirs rescales twice (1e-7 terms)


def test_gradcam_equals_pytorch_grad_cam_upsampled():
    if import_gradcam() is None:
        pytest.skip("grad-cam is not installed (pip install 'robustops[xai-peers]')")
    torch.manual_seed(0)
    model = models.papernot_mnist().eval()
    x = torch.rand(4, 1, 28, 28)
    targets = torch.tensor([0, 3, 3, 9])
    ref = _grad_cam_reference(model, model.conv4, x, targets)   # 8x8 map, min-max, then cv2 bilinear
    small = xai.gradcam(model, x, "conv4", targets, upsample=False, normalize="minmax")
    up = torch.nn.functional.interpolate(small[:, None], (28, 28), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(up.numpy(), ref, rtol=0, atol=1e-4)
