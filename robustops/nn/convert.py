"""``compactify(model)``: swap every nn.Conv2d / nn.Linear for its compact twin, weights copied."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .compact import CompactConv2d, CompactLinear

__all__ = ["compactify"]


def _compact_conv_from(m: nn.Conv2d, alpha: float, delta: float, learn_alpha: bool) -> CompactConv2d:
    new = CompactConv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
        m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype,
        alpha=alpha, delta=delta, learn_alpha=learn_alpha,
    )
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    new.weight.requires_grad_(m.weight.requires_grad)
    return new


def _compact_linear_from(m: nn.Linear, alpha: float, delta: float, learn_alpha: bool) -> CompactLinear:
    new = CompactLinear(
        m.in_features, m.out_features, m.bias is not None, device=m.weight.device, dtype=m.weight.dtype,
        alpha=alpha, delta=delta, learn_alpha=learn_alpha,
    )
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    new.weight.requires_grad_(m.weight.requires_grad)
    return new


def compactify(model: nn.Module, *, conv: bool = True, linear: bool = True, alpha: float = 1.0,
               delta: float = 0.01, learn_alpha: bool = True, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every ``nn.Conv2d`` (if ``conv``) and ``nn.Linear`` (if ``linear``)
    replaced by :class:`CompactConv2d` / :class:`CompactLinear` with the same hyper-parameters and
    copied weights. Layers that already are compact (or L2-softmax heads) are left alone. Works on a
    deep copy unless ``inplace=True``; the model passed in is then left unchanged. A bare Conv2d /
    Linear passed as ``model`` is converted too.

    Note: a compact layer normalises its input patches, so the converted model computes a different
    function; the copied weights are a starting point for (re-)training, not an equivalent model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .l2softmax import L2SoftmaxLinear

    skip = (CompactConv2d, CompactLinear, L2SoftmaxLinear)

    def convert(m: nn.Module):
        if isinstance(m, skip):
            return None
        if conv and type(m) is nn.Conv2d:
            return _compact_conv_from(m, alpha, delta, learn_alpha)
        if linear and type(m) is nn.Linear:
            return _compact_linear_from(m, alpha, delta, learn_alpha)
        return None

    root = model if inplace else copy.deepcopy(model)
    top = convert(root)
    if top is not None:
        return top

    def recurse(parent: nn.Module):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
            else:
                recurse(child)

    recurse(root)
    return root
