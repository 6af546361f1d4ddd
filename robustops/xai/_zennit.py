"""Interop with Zennit 1.0 for the equality tests and the benchmark (not used by robustops itself).

Zennit imports torchvision at import time only to name two torchvision ResNet block classes and
``FrozenBatchNorm2d``; torchvision does not install beside this project's CPU torch. When
torchvision is missing, :func:`import_zennit` registers a minimal stand-in module that provides
those three names (classes no model here is an instance of), which leaves every rule and
composite of Zennit untouched. :func:`zennit_canonizers` gives Zennit the canonizers it needs for
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


def import_zennit():
    """``zennit`` or None when it is not installed (a torchvision stand-in is added if needed)."""
    try:
        import zennit  # noqa: F401
        return zennit
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            return None
    tv = types.ModuleType("torchvision")
    tv.__robustops_stub__ = True
    ops = types.ModuleType("torchvision.ops")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")

    class FrozenBatchNorm2d(nn.Module):  # never instantiated
        pass

    class _Block(nn.Module):  # never instantiated
        pass

    ops.FrozenBatchNorm2d = FrozenBatchNorm2d
    resnet.BasicBlock = type("BasicBlock", (_Block,), {})
    resnet.Bottleneck = type("Bottleneck", (_Block,), {})
    tv.ops, tv.models, models.resnet = ops, models, resnet
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.models": models,
                        "torchvision.models.resnet": resnet})
    for key in [k for k in sys.modules if k == "zennit" or k.startswith("zennit.")]:
        del sys.modules[key]
    try:
        import zennit
    except ImportError:
        return None
    return zennit


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
