"""Loads the compiled core and keeps every op's Python-side registration in one place.

Each op in ``csrc/ops`` gets here:
  * a fake (meta) kernel via ``torch.library.register_fake`` so ``torch.compile`` and
    ``torch.library.opcheck`` can trace it without running it;
  * an autograd formula via ``torch.library.register_autograd`` when it is differentiable;
  * a thin typed wrapper that validates arguments with Python exceptions naming the argument
    and then calls ``torch.ops.robustops.<op>``.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

__all__ = ["fgsm_step"]

EpsLike = Union[float, int, Sequence[float], torch.Tensor]


# --------------------------------------------------------------------------------------------
# fgsm_step
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("robustops::fgsm_step")
def _fgsm_step_fake(x, grad, eps, lo, hi):
    torch._check(x.shape == grad.shape, lambda: "fgsm_step: x and grad must have the same shape")
    torch._check(eps.dim() == 1, lambda: "fgsm_step: eps must be 1-D")
    return x.new_empty((eps.shape[0], *x.shape))


def as_eps_tensor(eps: EpsLike, name: str = "eps") -> torch.Tensor:
    """Normalise a step size argument (number, sequence or tensor) to a 1-D float64 CPU tensor.

    Raises ``TypeError`` for a non-numeric value and ``ValueError`` for an empty, non-finite or
    negative value, naming ``name`` in the message.
    """
    if isinstance(eps, torch.Tensor):
        if not (eps.is_floating_point() or eps.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {eps.dtype}")
        t = eps.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(eps, bool):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got bool")
    elif isinstance(eps, (int, float)):
        t = torch.tensor([float(eps)], dtype=torch.float64)
    else:
        try:
            values = [float(e) for e in eps]
        except (TypeError, ValueError):
            raise TypeError(
                f"{name} must be a number, a sequence of numbers or a tensor, got {type(eps).__name__}"
            ) from None
        t = torch.tensor(values, dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError(f"{name} must contain at least one value")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0, got {t.tolist()}")
    return t


def fgsm_step(
    x: torch.Tensor, grad: torch.Tensor, eps: EpsLike, lo: float = 0.0, hi: float = 1.0
) -> torch.Tensor:
    """FGSM update for every step size at once: ``clamp(x + eps[k] * sign(grad), lo, hi)``.

    Args:
        x: input batch (any shape, float32/float64; float16/bfloat16 on CUDA).
        grad: gradient of the loss w.r.t. ``x``; same shape, dtype and device as ``x``.
        eps: step sizes, a number, sequence or 1-D tensor of K finite values >= 0.
        lo, hi: clamp range (pixel bounds), ``lo <= hi``.

    Returns:
        Tensor of shape ``[K, *x.shape]`` (contiguous). ``sign(0) = 0`` as in ``torch.sign``.
        Not differentiable: it is the last step of an attack, not part of a training graph.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad must be a torch.Tensor, got {type(grad).__name__}")
    if x.shape != grad.shape:
        raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")
    if x.dtype != grad.dtype:
        raise TypeError(f"grad must have the dtype of x ({x.dtype}), got {grad.dtype}")
    if x.device != grad.device:
        raise ValueError(f"grad must be on the device of x ({x.device}), got {grad.device}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"need lo <= hi (not NaN), got lo={lo}, hi={hi}")
    eps_t = as_eps_tensor(eps)
    return torch.ops.robustops.fgsm_step(x, grad, eps_t, lo, hi)


# --------------------------------------------------------------------------------------------
# kernel_dropout_eval  (robustops.fragile: batched one-kernel-at-a-time ablation)
# --------------------------------------------------------------------------------------------
def _pair(value, name: str):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got bool")
    if isinstance(value, int):
        return [int(value), int(value)]
    try:
        a, b = value
        return [int(a), int(b)]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def _kernel_dropout_out_hw(ho, wo, pool_kernel, pool_stride):
    if pool_kernel[0] > 0 or pool_kernel[1] > 0:
        return (ho - pool_kernel[0]) // pool_stride[0] + 1, (wo - pool_kernel[1]) // pool_stride[1] + 1
    return ho, wo


@torch.library.register_fake("robustops::kernel_dropout_eval")
def _kernel_dropout_eval_fake(base, delta, weight, channels, stride, padding, dilation, scale, shift, relu,
                              pool_kernel, pool_stride):
    torch._check(base.dim() == 4 and delta.dim() == 4 and weight.dim() == 4,
                 lambda: "kernel_dropout_eval: base, delta and weight must be 4-D")
    torch._check(channels.dim() == 1, lambda: "kernel_dropout_eval: channels must be 1-D")
    hp, wp = _kernel_dropout_out_hw(base.shape[2], base.shape[3], pool_kernel, pool_stride)
    # channels-last per variant, like the real kernels
    return base.new_empty((channels.shape[0], base.shape[0], hp, wp, base.shape[1])).permute(0, 1, 4, 2, 3)


def kernel_dropout_eval(
    base: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    channels: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    scale: "torch.Tensor | None" = None,
    shift: "torch.Tensor | None" = None,
    relu: bool = False,
    pool_kernel=0,
    pool_stride=None,
) -> torch.Tensor:
    """A convolution's output for many one-input-channel ablations at once, from its base output.

    For each ``c = channels[v]``::

        y = base - conv2d(delta[:, c:c+1], weight[:, c:c+1], stride, padding, dilation)
        y = y * scale + shift          (per output channel; both or neither, e.g. a folded BatchNorm)
        y = relu(y)                    (when relu)
        y = max_pool2d(y, pool_kernel, pool_stride)   (when pool_kernel > 0; no padding)

    Args:
        base: ``[N, Cout, Ho, Wo]`` the convolution's output (bias included) on the full input.
        delta: ``[N, Cin, H, W]`` per-channel change of the input under each ablation.
        weight: ``[Cout, Cin, kh, kw]`` (groups=1).
        channels: int64 ``[V]`` indices into ``Cin``.
        stride, padding, dilation: the convolution's (int or pair).
        pool_stride: defaults to ``pool_kernel``.

    Returns:
        ``[V, N, Cout, Hp, Wp]``, stored channels-last per variant (memory order
        ``[V, N, Hp, Wp, Cout]``), so ``out.reshape(V * N, Cout, Hp, Wp)`` is a ``channels_last``
        view. Not differentiable.
    """
    for name, t in (("base", base), ("delta", delta), ("weight", weight), ("channels", channels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if channels.dtype != torch.int64:
        raise TypeError(f"channels must be int64, got {channels.dtype}")
    pk = _pair(pool_kernel, "pool_kernel")
    ps = pk if pool_stride is None else _pair(pool_stride, "pool_stride")
    if (scale is None) != (shift is None):
        raise ValueError("give both scale and shift, or neither")
    return torch.ops.robustops.kernel_dropout_eval(
        base, delta, weight, channels, _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), scale, shift, bool(relu), pk, ps)
__all__ += ["kernel_dropout_eval"]
