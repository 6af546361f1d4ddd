"""Canonizers: make a model's computation explicit for LRP without changing what it computes.

Each canonizer is applied at the start of an LRP call and undone at its end (``apply`` returns a
handle whose ``remove()`` restores the model; the tracer calls it in ``finally``). None of them
writes a parameter or a buffer:

* :class:`MergeBatchNorm`: an eval-mode ``BatchNorm`` that directly consumes the output of a
  ``Linear`` / ``ConvNd`` (detected during the forward pass by tensor identity, so it works in
  ``Sequential`` models and in hand-written ``forward`` methods alike) is explained together with
  it as one linear layer ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mu) * gamma /
  sqrt(var + eps) + beta``; the BatchNorm itself then gets no rule. The folded map reproduces the
  pair's output (tested).
* :class:`ResidualSum`: the ``out + identity`` of :class:`robustops.models.BasicBlock` /
  :class:`~robustops.models.Bottleneck` becomes an explicit :class:`Sum` module (rule: ``Norm``,
  relevance split in proportion to each branch's contribution) by giving the block instance an
  equivalent ``forward`` for the duration of the call. Without it the relevance of the sum would
  be copied to both branches by autograd.
* :class:`CompactAsLinear`: ``CompactConv2d`` / ``CompactLinear`` / ``L2SoftmaxLinear`` are
  explained as the patch-normalised linear map they compute for the given input (see
  :mod:`robustops.xai.layers`). Without it they are refused as unsupported layers.
"""
from __future__ import annotations

import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.resnet import BasicBlock, Bottleneck

__all__ = ["Canonizer", "MergeBatchNorm", "ResidualSum", "CompactAsLinear", "Sum", "default_canonizers"]


class Sum(nn.Module):
    """``a + b`` as a module, so a rule can be attached to a residual addition."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _Handle:
    def __init__(self, undo: Optional[Callable[[], None]] = None, modules: Sequence[Tuple[str, nn.Module]] = ()):
        self._undo = undo
        self.modules = list(modules)

    def remove(self) -> None:
        if self._undo is not None:
            undo, self._undo = self._undo, None
            undo()


class Canonizer:
    """Base class: ``apply(model) -> handle`` (``handle.remove()`` undoes it; ``handle.modules``
    lists ``(name, module)`` pairs of helper modules the tracer must hook)."""

    def apply(self, model: nn.Module) -> _Handle:
        return _Handle()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MergeBatchNorm(Canonizer):
    """Explain ``Linear/ConvNd -> BatchNorm`` pairs as one linear layer (folding done in the tracer,
    per forward pass; nothing is written to the model)."""


class CompactAsLinear(Canonizer):
    """Explain compact layers as their patch-normalised linear map (``c_p W``, ``c`` fixed by the input)."""


def _basic_forward(block: BasicBlock, x: torch.Tensor, add: Sum) -> torch.Tensor:
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu1(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    return block.relu2(add(out, identity))


def _bottleneck_forward(block: Bottleneck, x: torch.Tensor, add: Sum) -> torch.Tensor:
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu1(block.bn1(block.conv1(x)))
    out = block.relu2(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    return block.relu3(add(out, identity))


class ResidualSum(Canonizer):
    """Route the residual additions of residual blocks through :class:`Sum` modules.

    ``blocks`` maps a block class to ``forward(block, x, add)``, an exact re-statement of the
    block's forward that calls ``add(a, b)`` for its addition; defaults cover
    :class:`robustops.models.BasicBlock` and :class:`~robustops.models.Bottleneck`. Pass your
    own mapping for other block types. The block's forward is replaced by an instance attribute
    for the duration of the call and deleted afterwards.
    """

    def __init__(self, blocks: Optional[Dict[type, Callable]] = None):
        self.blocks = {BasicBlock: _basic_forward, Bottleneck: _bottleneck_forward}
        if blocks:
            self.blocks.update(blocks)

    def apply(self, model: nn.Module) -> _Handle:
        patched: List[nn.Module] = []
        helpers: List[Tuple[str, nn.Module]] = []
        try:
            for name, m in model.named_modules():
                fn = self.blocks.get(type(m))
                if fn is None or "forward" in m.__dict__:
                    continue
                add = Sum()
                helpers.append((f"{name}.residual" if name else "residual", add))

                def forward(self_, x, _fn=fn, _add=add):
                    return _fn(self_, x, _add)

                m.forward = types.MethodType(forward, m)
                patched.append(m)
        except BaseException:
            for m in patched:
                del m.forward
            raise

        def undo():
            for m in patched:
                m.__dict__.pop("forward", None)

        return _Handle(undo, helpers)


def default_canonizers() -> List[Canonizer]:
    """``[MergeBatchNorm(), ResidualSum(), CompactAsLinear()]``: what ``lrp`` uses by default."""
    return [MergeBatchNorm(), ResidualSum(), CompactAsLinear()]
