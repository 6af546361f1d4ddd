"""Linear layers as LRP sees them: ``z = c * (W . x) + b``.

Every rule for a linear layer (LRP-0, epsilon, alpha-beta, z-plus, flat, w-square) is written once
against :class:`LinearMap`, which hides what kind of layer it is:

* ``nn.Linear`` and ``nn.Conv1d/2d/3d``: ``W . x`` is ``F.linear`` / ``F.convNd``; the transposed
  map ``W^T . s`` is ``s @ W`` / the convolution's input gradient (``torch.nn.grad.convNd_input``),
  computed directly, never by re-running the layer under autograd. ``c`` is 1.
* ``CompactLinear`` / ``L2SoftmaxLinear`` / ``CompactConv2d`` (Ranjan et al. 2017, eq. 6): the
  layer computes ``alpha * (W . x)_p / (||patch_p(x)||_2 + delta) + b``. Given the input, it is the
  linear map ``x -> (c_p W) . x + b`` with a positive per-sample, per-output-position scale
  ``c_p = alpha / (||patch_p(x)||_2 + delta)`` (one ``c`` per sample for the fully-connected
  case). LRP explains this patch-normalised linear map: ``c`` is computed once from the actual
  input and held fixed, so every rule sees the effective weights ``c_p W`` (z-plus: ``c_p W^+``,
  flat: ones, w-square: ``(c_p W)^2``). The normalisation is not differentiated (that would be a
  gradient, not a relevance redistribution).
* a linear layer followed by an eval-mode ``BatchNorm`` (the ``MergeBatchNorm`` canonizer): the
  pair is the single linear map ``W' = W * g``, ``b' = (b - mu) * g + beta`` with
  ``g = gamma / sqrt(var + eps)`` (per output channel); the model's parameters are never written.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.compact import CompactConv2d, CompactLinear

__all__ = ["LinearMap", "linear_map", "fold_batchnorm", "is_linear_layer"]

_CONV_FWD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_BWD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_linear_layer(module: nn.Module) -> bool:
    """Linear layers LRP's linear rules apply to (compact layers included)."""
    return isinstance(module, _LINEAR_TYPES)


class LinearMap:
    """One linear layer on one input batch: ``z = c^p * (W . x) + b`` with helpers the rules use.

    Attributes:
        weight, bias: the effective parameters (BatchNorm folded in when ``fold_batchnorm`` was
            applied); ``bias`` may be None.
        scale: ``c`` (broadcastable to the output) for compact layers, else None.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 kind: int, conv: Optional[dict] = None, pre_pad: Optional[Tuple[tuple, str]] = None,
                 scale: Optional[torch.Tensor] = None):
        self.module = module
        self.weight = weight
        self.bias = bias
        self.kind = kind  # 0: linear, 1/2/3: convNd
        self.conv = conv or {}
        self.pre_pad = pre_pad
        self.scale = scale
        self.input_shape = x.shape
        self._padded_shape = None

    # -- the layer's own input handling (padding modes other than zeros) ------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the kernel actually reads (``x`` itself unless a non-zero padding mode)."""
        if self.pre_pad is None:
            return x
        pads, mode = self.pre_pad
        xp = F.pad(x, pads, mode=mode)
        self._padded_shape = xp.shape
        return xp

    def unprepare(self, r: torch.Tensor) -> torch.Tensor:
        """Map relevance on the padded input back to ``x``: copies made by the padding give their
        relevance back to the pixel they copy (the adjoint of ``F.pad``)."""
        if self.pre_pad is None:
            return r
        pads, mode = self.pre_pad
        with torch.enable_grad():
            xr = torch.zeros(self.input_shape, dtype=r.dtype, device=r.device, requires_grad=True)
            (g,) = torch.autograd.grad(F.pad(xr, pads, mode=mode), xr, r)
        return g

    # -- forward and transpose -------------------------------------------------------------
    def _scale(self, power: int):
        if self.scale is None or power == 0:
            return None
        return self.scale if power == 1 else self.scale ** power

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                scale_power: int = 1) -> torch.Tensor:
        """``c^p * (weight . x) + bias`` (``x`` already prepared)."""
        if self.kind == 0:
            z = F.linear(x, weight)
        else:
            z = _CONV_FWD[self.kind](x, weight, None, **self.conv)
        c = self._scale(scale_power)
        if c is not None:
            z = z * c
        if bias is not None:
            z = z + (bias if self.kind == 0 else bias.view(-1, *([1] * self.kind)))
        return z

    def transpose(self, s: torch.Tensor, weight: torch.Tensor, in_shape, scale_power: int = 1) -> torch.Tensor:
        """``weight^T . (c^p * s)``: the input-side sum of ``s`` weighted by ``weight``."""
        c = self._scale(scale_power)
        if c is not None:
            s = s * c
        if self.kind == 0:
            return s.matmul(weight)
        if s.shape[0] != in_shape[0]:
            in_shape = (s.shape[0],) + tuple(in_shape[1:])
        return _CONV_BWD[self.kind](tuple(in_shape), weight, s, **self.conv)


def _conv_spec(m: nn.Module, kind: int):
    """(conv kwargs with explicit symmetric padding, pre-pad or None) for an nn.ConvNd."""
    padding = m.padding
    pre = None
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * kind
        else:  # "same": total = dilation * (k - 1) per dim, the extra pixel on the right
            pads, sym = [], []
            for d, k in zip(m.dilation, m.kernel_size):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
                sym.append(total // 2 if total % 2 == 0 else None)
            if all(s is not None for s in sym) and m.padding_mode == "zeros":
                padding = tuple(sym)
            else:
                flat = []
                for lo, hi in reversed(pads):
                    flat += [lo, hi]
                pre = (tuple(flat), "constant" if m.padding_mode == "zeros" else m.padding_mode)
                padding = (0,) * kind
    elif m.padding_mode != "zeros":
        flat = []
        for p in reversed(padding):
            flat += [p, p]
        pre = (tuple(flat), m.padding_mode)
        padding = (0,) * kind
    conv = dict(stride=m.stride, padding=tuple(padding), dilation=m.dilation, groups=m.groups)
    return conv, pre


def _compact_conv_scale(m: CompactConv2d, xp: torch.Tensor, conv: dict) -> torch.Tensor:
    """``c = alpha / (||patch||_2 + delta)`` per sample, output channel and position, ``[N, O, H', W']``."""
    g = conv["groups"]
    n, cin = xp.shape[:2]
    sq = xp.pow(2).reshape(n, g, cin // g, *xp.shape[2:]).sum(2)  # [N, G, H, W]
    ones = torch.ones(g, 1, *m.kernel_size, dtype=xp.dtype, device=xp.device)
    box = F.conv2d(sq, ones, None, conv["stride"], conv["padding"], conv["dilation"], g)
    c = m.alpha.to(xp.dtype) / (box.clamp_min(0).sqrt() + m.delta)
    # groups == 1: one norm per position, broadcast over the output channels
    return c if g == 1 else c.repeat_interleave(m.out_channels // g, dim=1)


def _positive_scale(lm: LinearMap, module: nn.Module) -> None:
    """A negative ``alpha`` goes into the weights (``c W = |c| (-W)``), so ``c > 0`` and the sign
    splits of z-plus / alpha-beta act on the effective weights."""
    if float(module.alpha.detach()) < 0:
        lm.weight = -lm.weight
        lm.scale = lm.scale.abs()


def linear_map(module: nn.Module, x: torch.Tensor) -> LinearMap:
    """The :class:`LinearMap` of a linear layer (``nn.Linear``, ``nn.ConvNd``, compact layers) on ``x``."""
    if isinstance(module, nn.Linear):
        lm = LinearMap(module, x, module.weight, module.bias, 0)
        if isinstance(module, CompactLinear):
            norm = x.norm(dim=-1, keepdim=True)
            lm.scale = module.alpha.to(x.dtype) / (norm + module.delta)
            _positive_scale(lm, module)
        return lm
    for kind, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if isinstance(module, cls):
            conv, pre = _conv_spec(module, kind)
            lm = LinearMap(module, x, module.weight, module.bias, kind, conv, pre)
            if isinstance(module, CompactConv2d):
                lm.scale = _compact_conv_scale(module, lm.prepare(x), conv)
                _positive_scale(lm, module)
            return lm
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def fold_batchnorm(lm: LinearMap, bn: nn.modules.batchnorm._BatchNorm) -> LinearMap:
    """``lm`` followed by eval-mode ``bn`` as one :class:`LinearMap` (new weight and bias tensors)."""
    var, mean = bn.running_var, bn.running_mean
    g = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        g = g * bn.weight
    shape = (-1,) + (1,) * (lm.weight.dim() - 1)
    w = lm.weight * g.view(shape).to(lm.weight.dtype)
    b = -mean if lm.bias is None else lm.bias - mean
    b = b * g
    if bn.bias is not None:
        b = b + bn.bias
    out = LinearMap(lm.module, torch.empty(0), w, b.to(w.dtype), lm.kind, lm.conv, lm.pre_pad, lm.scale)
    out.input_shape = lm.input_shape
    return out


def can_fold(bn: nn.Module) -> bool:
    """An eval-mode BatchNorm with running statistics: an affine map per channel."""
    return (isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None)
