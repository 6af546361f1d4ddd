"""Compact convolution layers (Ranjan et al. 2017, Sec. 4): drop-in ``CompactConv2d`` and
``CompactLinear``, backed by the fused ``robustops.ops.compact_conv2d`` / ``compact_linear`` ops."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._ops import _check_delta, compact_conv2d, compact_linear

__all__ = ["CompactConv2d", "CompactLinear"]

_size_2_t = Union[int, Sequence[int]]


def _check_alpha_init(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha


def _init_compact_scale(module: nn.Module, alpha, delta, learn_alpha: bool, device, dtype) -> None:
    """Checked ``delta`` attribute and scalar ``alpha`` (a Parameter, or a buffer when fixed)."""
    alpha = _check_alpha_init(alpha)
    module.delta = _check_delta(delta)
    a = torch.tensor(alpha, device=device, dtype=dtype or torch.get_default_dtype())
    if learn_alpha:
        module.alpha = nn.Parameter(a)
    else:
        module.register_buffer("alpha", a)


def _compact_repr(module: nn.Module) -> str:
    return f", delta={module.delta}, learn_alpha={isinstance(module.alpha, nn.Parameter)}"


class CompactConv2d(nn.Conv2d):
    """Compact convolution: ``alpha * conv2d(x, W) / (||patch||_2 + delta) + b``.

    Same constructor as :class:`torch.nn.Conv2d` plus ``alpha`` (initial value of the learnable
    scalar; ``learn_alpha=False`` makes it a fixed buffer) and ``delta`` (0.01 in the paper). Every
    input patch a kernel sees (``kh x kw x in_channels/groups``) is L2-normalised and scaled by
    ``alpha`` before the kernel is applied; with ``groups > 1`` the norm is per group.
    ``padding_mode`` other than ``'zeros'`` and asymmetric ``padding='same'`` are applied by padding
    the input first, so the norm covers exactly the values the kernel sees.

    Parameters: ``weight``, ``bias`` (if ``bias=True``), ``alpha`` (0-dim). Because the backward
    reuses this layer's output, do not modify the output in place (use ``nn.ReLU()``, not
    ``nn.ReLU(inplace=True)``, right after it). Under ``torch.autocast`` (CPU or CUDA) the layer
    computes in float32 (float64 for float64 inputs) and returns that dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: Union[str, _size_2_t] = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        alpha: float = 1.0,
        delta: float = 0.01,
        learn_alpha: bool = True,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        _init_compact_scale(self, alpha, delta, learn_alpha, device, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + _compact_repr(self)

    def _explicit_padding(self):
        """(pre-pad for F.pad or None, symmetric padding for the op)."""
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return None, (0, 0)
            # 'same' (stride 1 only, as in nn.Conv2d): total = dilation * (k - 1) per dim
            pads, sym = [], []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                left = total // 2
                pads.append((left, total - left))
                sym.append(left if total % 2 == 0 else None)
            if all(s is not None for s in sym) and self.padding_mode == "zeros":
                return None, (sym[0], sym[1])
            return (pads[1][0], pads[1][1], pads[0][0], pads[0][1]), (0, 0)
        if self.padding_mode == "zeros":
            return None, tuple(self.padding)
        ph, pw = self.padding
        return (pw, pw, ph, ph), (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"CompactConv2d expects a 3-D or 4-D input, got shape {tuple(x.shape)}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(
                f"CompactConv2d expects {self.in_channels} input channels, got input of shape {tuple(x.shape)}"
            )
        pre, padding = self._explicit_padding()
        if pre is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pre, mode=mode)
        return compact_conv2d(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups, self.alpha, self.delta
        )


class CompactLinear(nn.Linear):
    """Compact fully-connected layer: ``alpha * W x / (||x||_2 + delta) + b``.

    Same constructor as :class:`torch.nn.Linear` plus ``alpha`` (initial value, learnable unless
    ``learn_alpha=False``) and ``delta``. Unlike :class:`CompactConv2d`, its output may be modified
    in place (``nn.ReLU(inplace=True)`` after it is fine: the backward does not reuse the output).
    Under ``torch.autocast`` it computes in float32 and returns float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        alpha: float = 1.0,
        delta: float = 0.01,
        learn_alpha: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _init_compact_scale(self, alpha, delta, learn_alpha, device, dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + _compact_repr(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects in_features={self.in_features} in the last dimension, "
                f"got input of shape {tuple(x.shape)}"
            )
        return compact_linear(x, self.weight, self.bias, self.alpha, self.delta)
