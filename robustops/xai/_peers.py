"""Interop with Zennit 1.0 and pytorch-grad-cam for the equality tests and the benchmarks (not used
by robustops itself).

Both import torchvision at import time only for names they do not use on our models (Zennit: two
torchvision ResNet block classes and ``FrozenBatchNorm2d``; pytorch-grad-cam: transforms, a resize,
``box_iou``); torchvision does not install beside this project's CPU torch. When torchvision is
missing, :func:`install_torchvision_standin` registers a minimal stand-in that provides those names
(classes no model here is an instance of, functions that raise), which leaves every rule,
composite and CAM computation of the peers untouched. :func:`zennit_canonizers` gives Zennit the canonizers it needs for
``robustops.models`` ResNets (BatchNorm merging by name, residual sums), mirroring what
``zennit.torchvision.ResNetCanonizer`` does for torchvision's.
"""
from __future__ import annotations

import sys
import types
from typing import List, Optional

import torch
from torch import nn

from ..models.resnet import BasicBlock, Bottleneck


def install_torchvision_standin() -> bool:
    """Register a minimal ``torchvision`` stand-in when torchvision is not importable.

    It only provides the names zennit and pytorch-grad-cam touch at import time (classes no
    model here is an instance of; functions that raise if called). Returns True if installed."""
    try:
        import torchvision  # noqa: F401
        return False
    except ImportError:
        pass

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed (robustops test stand-in)")

    class _Never(nn.Module):  # never instantiated by the models here
        pass

    mods = {n: types.ModuleType(n) for n in (
        "torchvision", "torchvision.ops", "torchvision.models", "torchvision.models.resnet",
        "torchvision.transforms", "torchvision.transforms.functional")}
    mods["torchvision"].__robustops_standin__ = True
    mods["torchvision.ops"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (_Never,), {})
    mods["torchvision.ops"].box_iou = unavailable
    mods["torchvision.models.resnet"].BasicBlock = type("BasicBlock", (_Never,), {})
    mods["torchvision.models.resnet"].Bottleneck = type("Bottleneck", (_Never,), {})
    for name in ("Compose", "Normalize", "ToTensor", "Resize"):
        setattr(mods["torchvision.transforms"], name, type(name, (), {"__init__": unavailable}))
    mods["torchvision.transforms.functional"].resize = unavailable
    mods["torchvision"].ops = mods["torchvision.ops"]
    mods["torchvision"].models = mods["torchvision.models"]
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.models"].resnet = mods["torchvision.models.resnet"]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
    sys.modules.update(mods)
    return True


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("torchvision"):
            return None
    install_torchvision_standin()
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def import_zennit():
    """``zennit`` or None when it is not installed (a torchvision stand-in is added if needed)."""
    return _import("zennit")


def import_gradcam():
    """``pytorch_grad_cam`` (PyPI ``grad-cam``) or None (a torchvision stand-in is added if needed)."""
    return _import("pytorch_grad_cam")


def zennit_canonizers(model: nn.Module) -> List:
    """Zennit canonizers for ``model``: BatchNorm merged into the conv before it (by name) and the
    residual additions of robustops' BasicBlock / Bottleneck routed through ``zennit.layer.Sum``."""
    zennit = import_zennit()
    if zennit is None:
        raise ImportError("zennit is not installed")
    from zennit.canonizers import AttributeCanonizer, NamedMergeBatchNorm
    from zennit.layer import Sum

    named = dict(model.named_modules())
    pairs = []
    for name, m in named.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            prefix, _, last = name.rpartition(".")
            if last.startswith("bn"):
                conv = (prefix + "." if prefix else "") + "conv" + last[2:]
            elif last.isdigit() and int(last) > 0:
                conv = (prefix + "." if prefix else "") + str(int(last) - 1)
            else:
                continue
            if conv in named:
                pairs.append(((conv,), name))

    def forward_basic(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.canonizer_sum(torch.stack([identity, out], dim=-1)))

    def forward_bottleneck(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.canonizer_sum(torch.stack([identity, out], dim=-1)))

    def attribute_map(name, module) -> Optional[dict]:
        if isinstance(module, BasicBlock):
            return {"forward": forward_basic.__get__(module), "canonizer_sum": Sum()}
        if isinstance(module, Bottleneck):
            return {"forward": forward_bottleneck.__get__(module), "canonizer_sum": Sum()}
        return None

    return [NamedMergeBatchNorm(pairs), AttributeCanonizer(attribute_map)]


def zennit_epsilon_plus_flat(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Zennit 1.0's ``EpsilonPlusFlat`` relevance at ``x`` for ``target`` (one-hot output gradient)."""
    zennit = import_zennit()
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    composite = EpsilonPlusFlat(canonizers=zennit_canonizers(model))
    out_grad = torch.zeros(x.shape[0], _num_outputs(model, x), dtype=x.dtype, device=x.device)
    out_grad[torch.arange(x.shape[0]), target] = 1
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, out_grad)
    return relevance


def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return model(x[:1]).shape[1]
