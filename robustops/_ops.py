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
import operator
from typing import Sequence, Union

import torch

from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

__all__ = ["fgsm_step"]

EpsLike = Union[float, int, Sequence[float], torch.Tensor]


_PAIR_MAX = 2**31 - 1  # geometry above this is never meaningful (and would overflow int64 sizes)


def _pair(v, name: str, minimum: int = 0) -> list:
    """An int or a pair of ints (stride, padding, ...) as a 2-list, each in ``[minimum, 2**31 - 1]``.

    Raises ``TypeError`` for a non-integer (bool, float, str, ...) and ``ValueError`` for a wrong
    length or a value out of range, naming ``name``. The upper bound keeps absurd geometry (e.g. a
    stride of 2**62) from reaching the kernels; the C++ checks are overflow-safe on their own too.
    """
    def as_int(e):
        if isinstance(e, bool):
            raise TypeError(f"{name} must be an int or a pair of ints, got bool")
        try:
            return operator.index(e)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {type(e).__name__}") from None

    if isinstance(v, (str, bytes)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(v).__name__}")
    try:
        out = [as_int(v)] * 2
    except TypeError:
        try:
            items = list(v)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {type(v).__name__}") from None
        if len(items) != 2:
            raise ValueError(f"{name} must have 2 values, got {len(items)}")
        out = [as_int(e) for e in items]
    if out[0] < minimum or out[1] < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(out)}")
    if out[0] > _PAIR_MAX or out[1] > _PAIR_MAX:
        raise ValueError(f"{name} must be <= {_PAIR_MAX}, got {tuple(out)}")
    return out


def _fake_same_device(op: str, ref: torch.Tensor, ref_name: str, tensors: dict, host_ok: dict = None) -> None:
    """Fake (meta) kernels: refuse tensors on another device than ``ref`` (e.g. a meta ``x`` with a
    real CPU ``weight``), as the real kernels do. ``host_ok`` tensors may also be on the CPU."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device,
                         lambda: f"{op}: {name} must be on {ref_name}'s device ({ref.device}), got {t.device}")
    for name, t in (host_ok or {}).items():
        if t is not None:
            torch._check(t.device == ref.device or t.device.type == "cpu",
                         lambda: f"{op}: {name} must be on the CPU or on {ref_name}'s device ({ref.device}), "
                                 f"got {t.device}")


# --------------------------------------------------------------------------------------------
# fgsm_step
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("robustops::fgsm_step")
def _fgsm_step_fake(x, grad, eps, lo, hi):
    _fake_same_device("fgsm_step", x, "x", {"grad": grad}, {"eps": eps})
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


def _check_like_x(x, **others) -> None:
    """``x`` and every named tensor in ``others``: tensors with x's shape, dtype and device."""
    for name, t in (("x", x), *others.items()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


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
    _check_like_x(x, grad=grad)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"need lo <= hi (not NaN), got lo={lo}, hi={hi}")
    eps_t = as_eps_tensor(eps)
    return torch.ops.robustops.fgsm_step(x, grad, eps_t, lo, hi)


# --------------------------------------------------------------------------------------------
# compact_conv2d / compact_linear (Ranjan et al. 2017, compact convolution; issue #4)
# --------------------------------------------------------------------------------------------
# Autograd saves (x, weight, bias, alpha, out) and calls the matching _..._backward op, which
# returns (grad_x, grad_weight, grad_bias, grad_alpha); entries not asked for come back as empty
# [0] tensors. compact_conv2d's backward uses `out - bias` (= alpha * u / n) instead of recomputing
# the convolution, so its `out` must not be modified in place afterwards (autograd's version check
# raises if it is; use nn.ReLU(inplace=False) right after a CompactConv2d). compact_linear's
# backward does not need its output.
#
# Under torch.autocast (CPU or CUDA) the ops run in float32 (float64 if an input is float64) and
# return that dtype: C++ Autocast kernels in csrc/ops/<op>.cpp, policy in csrc/ops/autocast_policy.h.
IntPair = Union[int, Sequence[int]]
AlphaLike = Union[float, int, torch.Tensor]

__all__ += ["compact_conv2d", "compact_linear"]


def _conv_out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("robustops::compact_conv2d")
def _compact_conv2d_fake(x, weight, bias, stride, padding, dilation, groups, alpha, delta):
    _fake_same_device("compact_conv2d", x, "x", {"weight": weight, "bias": bias}, {"alpha": alpha})
    torch._check(x.dim() == 4, lambda: "compact_conv2d: x must be 4-D")
    torch._check(weight.dim() == 4, lambda: "compact_conv2d: weight must be 4-D")
    torch._check(x.shape[1] == weight.shape[1] * groups, lambda: "compact_conv2d: channel mismatch")
    ho = _conv_out(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = _conv_out(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0], ho, wo))


def _masked_grads_fake(x, weight, bias, alpha, mask):
    return (
        x.new_empty(x.shape) if mask[0] else x.new_empty((0,)),
        weight.new_empty(weight.shape) if mask[1] else x.new_empty((0,)),
        x.new_empty((weight.shape[0],)) if (mask[2] and bias is not None) else x.new_empty((0,)),
        alpha.new_empty(alpha.shape) if mask[3] else x.new_empty((0,)),
    )


@torch.library.register_fake("robustops::_compact_conv2d_backward")
def _compact_conv2d_backward_fake(
    grad_out, x, weight, bias, out, stride, padding, dilation, groups, alpha, delta, output_mask
):
    _fake_same_device("_compact_conv2d_backward", x, "x",
                      {"grad_out": grad_out, "weight": weight, "bias": bias, "out": out}, {"alpha": alpha})
    return _masked_grads_fake(x, weight, bias, alpha, output_mask)


def _compact_conv2d_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, alpha, delta = inputs
    ctx.save_for_backward(x, weight, bias, alpha, output)
    ctx.conv_args = (stride, padding, dilation, groups, delta)


def _compact_conv2d_backward(ctx, grad_out):
    x, weight, bias, alpha, out = ctx.saved_tensors
    stride, padding, dilation, groups, delta = ctx.conv_args
    nig = ctx.needs_input_grad
    mask = [nig[0], nig[1], nig[2] and bias is not None, nig[7]]
    gx, gw, gb, ga = torch.ops.robustops._compact_conv2d_backward(
        grad_out.contiguous(), x, weight, bias, out, stride, padding, dilation, groups, alpha, delta, mask
    )
    return (
        gx if mask[0] else None,
        gw if mask[1] else None,
        gb if mask[2] else None,
        None,
        None,
        None,
        None,
        ga if mask[3] else None,
        None,
    )


torch.library.register_autograd(
    "robustops::compact_conv2d", _compact_conv2d_backward, setup_context=_compact_conv2d_setup_context
)


@torch.library.register_fake("robustops::compact_linear")
def _compact_linear_fake(x, weight, bias, alpha, delta):
    _fake_same_device("compact_linear", x, "x", {"weight": weight, "bias": bias}, {"alpha": alpha})
    torch._check(weight.dim() == 2, lambda: "compact_linear: weight must be 2-D")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "compact_linear: in_features mismatch")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("robustops::_compact_linear_backward")
def _compact_linear_backward_fake(grad_out, x, weight, bias, alpha, delta, output_mask):
    _fake_same_device("_compact_linear_backward", x, "x", {"grad_out": grad_out, "weight": weight, "bias": bias},
                      {"alpha": alpha})
    return _masked_grads_fake(x, weight, bias, alpha, output_mask)


# compact_linear's backward does not use the forward output (unlike compact_conv2d's), so the
# output is not saved and may be modified in place (ReLU(inplace=True) after a CompactLinear).
def _compact_linear_setup_context(ctx, inputs, output):
    x, weight, bias, alpha, delta = inputs
    ctx.save_for_backward(x, weight, bias, alpha)
    ctx.delta = delta


def _compact_linear_backward(ctx, grad_out):
    x, weight, bias, alpha = ctx.saved_tensors
    nig = ctx.needs_input_grad
    mask = [nig[0], nig[1], nig[2] and bias is not None, nig[3]]
    gx, gw, gb, ga = torch.ops.robustops._compact_linear_backward(
        grad_out.contiguous(), x, weight, bias, alpha, ctx.delta, mask
    )
    return (
        gx if mask[0] else None,
        gw if mask[1] else None,
        gb if mask[2] else None,
        ga if mask[3] else None,
        None,
    )


torch.library.register_autograd(
    "robustops::compact_linear", _compact_linear_backward, setup_context=_compact_linear_setup_context
)


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _alpha_tensor(alpha: AlphaLike, like: torch.Tensor) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a scalar (one element), got shape {tuple(alpha.shape)}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating-point tensor, got dtype {alpha.dtype}")
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number or a one-element tensor, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return torch.tensor(float(alpha), dtype=like.dtype, device=like.device)


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a number, got {type(delta).__name__}")
    delta = float(delta)
    if not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be finite and >= 0, got {delta}")
    return delta


def compact_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    alpha: AlphaLike = 1.0,
    delta: float = 0.01,
) -> torch.Tensor:
    """Compact convolution (Ranjan et al. 2017, eq. 6):
    ``alpha * conv2d(x, weight) / (||patch||_2 + delta) + bias``.

    Each ``kh x kw x (C/groups)`` input patch the kernel sees is L2-normalised (with ``delta``) and
    scaled by ``alpha`` before the kernel is applied. The norm uses the convolution's stride,
    zero padding and dilation; with ``groups > 1`` it is taken per group (over that group's input
    channels) and shared by the group's output channels. Differentiable in ``x``, ``weight``,
    ``bias`` and ``alpha``. The gradient of the norm is taken as 0 at all-zero patches.

    Args:
        x: ``[N, C, H, W]`` or unbatched ``[C, H, W]``; float32/float64 (CUDA: also half/bfloat16).
        weight: ``[Cout, C/groups, kh, kw]``. bias: ``[Cout]`` or None.
        stride, padding, dilation: int or pair (zero padding), each at most 2**31 - 1 (larger
            values raise ``ValueError``; the op's overflow-checked geometry raises ``RuntimeError``).
        groups: int >= 1.
        alpha: number or one-element tensor (e.g. a learnable parameter); must be finite.
        delta: finite, >= 0 (0.01 in the paper).

    Under ``torch.autocast`` the op computes and returns float32 (float64 for float64 inputs).
    """
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if bias is not None:
        _check_tensor(bias, "bias")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    delta = _check_delta(delta)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [Cout, C/groups, kh, kw], got shape {tuple(weight.shape)}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W] or 3-D [C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight {tuple(weight.shape)} with groups={groups} "
            f"expects {weight.shape[1] * groups}"
        )
    if weight.shape[0] % groups != 0:
        raise ValueError(f"out channels ({weight.shape[0]}) must be divisible by groups ({groups})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    alpha_t = _alpha_tensor(alpha, x)
    y = torch.ops.robustops.compact_conv2d(x, weight, bias, stride, padding, dilation, groups, alpha_t, delta)
    return y.squeeze(0) if unbatched else y


def compact_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    alpha: AlphaLike = 1.0,
    delta: float = 0.01,
) -> torch.Tensor:
    """Compact fully-connected layer: ``alpha * x @ weight.T / (||x||_2 + delta) + bias``.

    ``x`` is ``[..., in_features]`` (the norm is over the last dimension), ``weight`` is
    ``[out_features, in_features]``. Differentiable in ``x``, ``weight``, ``bias`` and ``alpha``;
    the gradient of the norm is taken as 0 for an all-zero feature vector.

    Returns a fresh contiguous ``[..., out_features]`` tensor (not a view); the backward does not
    read it, so it may be modified in place (e.g. ``ReLU(inplace=True)``). dtypes: float32/float64
    on the CPU (float16/bfloat16 raise ``RuntimeError``), also float16/bfloat16 on CUDA. Under
    ``torch.autocast`` the op computes and returns float32 (float64 if an input is float64).
    """
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if bias is not None:
        _check_tensor(bias, "bias")
    delta = _check_delta(delta)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must have in_features={weight.shape[1]} in its last dimension, got shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    alpha_t = _alpha_tensor(alpha, x)
    return torch.ops.robustops.compact_linear(x, weight, bias, alpha_t, delta)


# --------------------------------------------------------------------------------------------
# kernel_dropout_eval  (robustops.fragile: batched one-kernel-at-a-time ablation)
# --------------------------------------------------------------------------------------------
def _kernel_dropout_out_hw(ho, wo, pool_kernel, pool_stride):
    if pool_kernel[0] > 0 or pool_kernel[1] > 0:
        return (ho - pool_kernel[0]) // pool_stride[0] + 1, (wo - pool_kernel[1]) // pool_stride[1] + 1
    return ho, wo


@torch.library.register_fake("robustops::kernel_dropout_eval")
def _kernel_dropout_eval_fake(base, delta, weight, channels, stride, padding, dilation, scale, shift, relu,
                              pool_kernel, pool_stride):
    _fake_same_device("kernel_dropout_eval", base, "base",
                      {"delta": delta, "weight": weight, "scale": scale, "shift": shift}, {"channels": channels})
    torch._check(all(k >= 0 for k in pool_kernel) and all(s >= 0 for s in pool_stride),
                 lambda: f"kernel_dropout_eval: pool_kernel and pool_stride must be >= 0, got {list(pool_kernel)}, "
                         f"{list(pool_stride)}")
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
        stride, padding, dilation: the convolution's (int or pair; at most 2**31 - 1).
        pool_kernel: int or pair >= 0; 0 (both) means no pooling. Negative values raise
            ``ValueError`` here and ``RuntimeError`` from the op.
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
        base, delta, weight, channels, _pair(stride, "stride", 1), _pair(padding, "padding"),
        _pair(dilation, "dilation", 1), scale, shift, bool(relu), pk, ps)
__all__ += ["kernel_dropout_eval"]


# --------------------------------------------------------------------------------------------
# apgd_step / fab_projection  (AutoAttack, issue #15: robustops.attacks.{apgd,fab})
# --------------------------------------------------------------------------------------------
_AA_NORMS = ("Linf", "L2")


def _aa_norm(norm) -> str:
    if norm not in _AA_NORMS:
        raise ValueError(f"norm must be one of {_AA_NORMS}, got {norm!r}")
    return norm


def _aa_finite(v, name: str, minimum: float = None, maximum: float = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        rng = f" in [{minimum}, {maximum}]" if maximum is not None else (f" >= {minimum}" if minimum is not None else "")
        raise ValueError(f"{name} must be finite{rng}, got {v}")
    return v


@torch.library.register_fake("robustops::apgd_step")
def _apgd_step_fake(x, x_prev, x0, grad, step_size, eps, momentum, lo, hi, norm):
    torch._check(x.shape == x_prev.shape and x.shape == x0.shape and x.shape == grad.shape,
                 lambda: "apgd_step: x, x_prev, x0 and grad must have the same shape")
    torch._check(step_size.dim() == 1 and step_size.shape[0] == x.shape[0],
                 lambda: "apgd_step: step_size must be [N]")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("robustops::fab_projection")
def _fab_projection_fake(points, w, b, lo, hi, norm):
    torch._check(points.dim() == 2 and w.shape == points.shape, lambda: "fab_projection: points, w must be [B, D]")
    torch._check(b.dim() == 1 and b.shape[0] == points.shape[0], lambda: "fab_projection: b must be [B]")
    return torch.empty_like(points, memory_format=torch.contiguous_format)


def apgd_step(x: torch.Tensor, x_prev: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor,
              step_size, eps: float, momentum: float = 0.75, lo: float = 0.0, hi: float = 1.0,
              norm: str = "Linf") -> torch.Tensor:
    """APGD's projected momentum step (Croce & Hein 2020, Alg. 1), one fused pass.

    ``z = P(x + step * s(grad))``, ``out = P(x + momentum * (z - x) + (1 - momentum) * (x - x_prev))``
    with ``s = sign`` (Linf) or ``g / (||g||_2 + 1e-12)`` per sample (L2), and ``P`` the projection
    onto the ``eps`` ball around ``x0`` followed by a clamp to ``[lo, hi]`` (the reference code's order).

    Args:
        x, x_prev, x0, grad: ``[N, ...]`` tensors of one floating dtype and device (current iterate,
            previous iterate, clean point, loss gradient at ``x``); pixel space ``[lo, hi]``.
        step_size: number or ``[N]`` tensor of per-sample step sizes (finite, >= 0).
        eps: ball radius (finite, >= 0); momentum in ``[0, 1]`` (1 = no momentum, the first step).
        norm: ``"Linf"`` or ``"L2"``.

    Returns: ``[N, ...]`` contiguous. Raises ``TypeError``/``ValueError`` naming a bad argument.
    Reference: :func:`robustops.ops.apgd_step_reference` (eager PyTorch).
    """
    norm = _aa_norm(norm)
    _check_like_x(x, x_prev=x_prev, x0=x0, grad=grad)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension")
    if isinstance(step_size, torch.Tensor):
        step = step_size.detach().reshape(-1).to(device=x.device, dtype=x.dtype)
        if step.numel() == 1:
            step = step.expand(x.shape[0]).contiguous()
        if step.numel() != x.shape[0]:
            raise ValueError(f"step_size must hold one value per sample ({x.shape[0]}), got {step.numel()}")
    else:
        step = torch.full((x.shape[0],), _aa_finite(step_size, "step_size", 0.0), dtype=x.dtype, device=x.device)
    eps = _aa_finite(eps, "eps", 0.0)
    momentum = _aa_finite(momentum, "momentum", 0.0, 1.0)
    lo, hi = _aa_finite(lo, "lo"), _aa_finite(hi, "hi")
    if lo > hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    return torch.ops.robustops.apgd_step(x, x_prev, x0, grad, step, eps, momentum, lo, hi, norm)


def fab_projection(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lo: float = 0.0, hi: float = 1.0,
                   norm: str = "Linf") -> torch.Tensor:
    """FAB's minimal-norm step onto a hyperplane inside the box (Croce & Hein 2020, FAB, eq. 6-7).

    For each row ``i``: ``d = argmin ||d||_p`` subject to ``<w_i, t_i + d> = b_i`` and
    ``lo <= t_i + d <= hi`` (``p`` = inf or 2). When the hyperplane is out of reach inside the box,
    every coordinate moves to the face that brings ``<w_i, t_i + d>`` closest to ``b_i``.

    Args:
        points: ``[B, D]`` points ``t`` inside ``[lo, hi]``; w: ``[B, D]`` hyperplane normals;
            b: ``[B]`` offsets; one floating dtype and device; ``w`` and ``b`` finite.
        norm: ``"Linf"`` or ``"L2"``.

    Returns: ``d`` of shape ``[B, D]``. Coordinates with ``w == 0`` (Linf) or ``|w| < 1e-8`` (L2)
    are never moved. Reference: :func:`robustops.ops.fab_projection_reference`.
    """
    norm = _aa_norm(norm)
    for name, t in (("points", points), ("w", w), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != points.dtype or not t.is_floating_point():
            raise TypeError(f"{name} must be floating point with the dtype of points ({points.dtype}), got {t.dtype}")
        if t.device != points.device:
            raise ValueError(f"{name} must be on the device of points ({points.device}), got {t.device}")
    if points.dim() != 2 or w.shape != points.shape:
        raise ValueError(f"points and w must both be [B, D], got {tuple(points.shape)} and {tuple(w.shape)}")
    if b.shape != (points.shape[0],):
        raise ValueError(f"b must be [B] = [{points.shape[0]}], got {tuple(b.shape)}")
    lo, hi = _aa_finite(lo, "lo"), _aa_finite(hi, "hi")
    if lo > hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    return torch.ops.robustops.fab_projection(points, w, b, lo, hi, norm)


def apgd_step_reference(x, x_prev, x0, grad, step_size, eps, momentum=0.75, lo=0.0, hi=1.0, norm="Linf"):
    """Eager-PyTorch reference of :func:`apgd_step` (the authors' formulas, op for op)."""
    view = (-1,) + (1,) * (x.dim() - 1)
    step = (step_size if isinstance(step_size, torch.Tensor) else torch.full((x.shape[0],), float(step_size)))
    step = step.to(x.device, x.dtype).reshape(view)

    def l2(t):
        return t.reshape(t.shape[0], -1).norm(dim=1).reshape(view)

    if norm == "Linf":
        z = torch.clamp(torch.min(torch.max(x + step * grad.sign(), x0 - eps), x0 + eps), lo, hi)
        v = x + (z - x) * momentum + (x - x_prev) * (1 - momentum)
        return torch.clamp(torch.min(torch.max(v, x0 - eps), x0 + eps), lo, hi)
    z = x + step * grad / (l2(grad) + 1e-12)
    u = z - x0
    z = torch.clamp(x0 + u / (l2(u) + 1e-12) * torch.clamp(l2(u), max=eps), lo, hi)
    v = x + (z - x) * momentum + (x - x_prev) * (1 - momentum)
    u = v - x0
    return torch.clamp(x0 + u / (l2(u) + 1e-12) * torch.clamp(l2(u), max=eps), lo, hi)


def fab_projection_reference(points, w, b, lo=0.0, hi=1.0, norm="Linf"):
    """Eager-PyTorch reference of :func:`fab_projection`: sort the breakpoints, cumulative sums,
    pick the linear piece of ``h(a) = sum_j u_j min(a, q_j)`` that reaches ``c`` (float64)."""
    t, w, b = points.double(), w.double(), b.double()
    c0 = (w * t).sum(1) - b
    sgn = torch.where(c0 >= 0, 1.0, -1.0).to(t)
    ws = w * sgn[:, None]
    c = c0.abs()
    active = ws != 0 if norm == "Linf" else ws.abs() >= 1e-8
    dist = torch.where(ws > 0, t - lo, hi - t).clamp(min=0)
    if norm == "Linf":
        u, q = ws.abs(), dist
    else:
        u, q = ws * ws, dist / ws.abs().clamp(min=1e-300)
    u = torch.where(active, u, torch.zeros_like(u))
    q = torch.where(active, q, torch.full_like(q, float("inf")))
    qs, idx = q.sort(1)
    us = u.gather(1, idx)
    suffix = us.flip(1).cumsum(1).flip(1)                      # sum of u over q >= q_(k)
    below = torch.cat([torch.zeros_like(c)[:, None], (us * torch.where(torch.isinf(qs), 0.0, qs)).cumsum(1)[:, :-1]], 1)
    cand = (c[:, None] - below) / suffix
    ok = (cand <= qs) & (suffix > 0)
    k = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(c, -1, dtype=torch.long))
    a = torch.where(k >= 0, cand.gather(1, k.clamp(min=0)[:, None])[:, 0].clamp(min=0),
                    torch.full_like(c, float("inf")))
    qf = torch.where(active, q, torch.zeros_like(q))
    step = torch.minimum(a[:, None], qf)
    d = torch.where(ws > 0, -step, step) if norm == "Linf" else -ws * step
    return torch.where(active, d, torch.zeros_like(d)).to(points.dtype)


__all__ += ["apgd_step", "fab_projection", "apgd_step_reference", "fab_projection_reference"]


# --------------------------------------------------------------------------------------------
# forest_leaf_masks  (issue #10: robustops.detect's random forests, per-tree leaf bit masks)
# --------------------------------------------------------------------------------------------
@torch.library.register_fake("robustops::forest_leaf_masks")
def _forest_leaf_masks_fake(x, groups, columns, input_start, cuts, cut_start, bin_map, mask_start, masks, leaf_start,
                            value):
    _fake_same_device("forest_leaf_masks", x, "x", {"groups": groups, "columns": columns, "input_start": input_start,
                                                    "cuts": cuts, "cut_start": cut_start, "bin_map": bin_map,
                                                    "mask_start": mask_start, "masks": masks,
                                                    "leaf_start": leaf_start, "value": value})
    torch._check(x.dim() == 2 and groups.dim() == 1 and masks.dim() == 2 and value.dim() == 2,
                 lambda: "forest_leaf_masks: x [N, M], groups [N], masks [R, words], value [L, C]")
    torch._check(groups.shape[0] == x.shape[0], lambda: "forest_leaf_masks: groups must be [N]")
    return value.new_empty((x.shape[0], value.shape[1]))


_FOREST_ARGS = (("x", (torch.float32,), 2), ("groups", (torch.int64,), 1), ("columns", (torch.int64,), 1),
                ("input_start", (torch.int64,), 1), ("cuts", (torch.float32,), 1), ("cut_start", (torch.int64,), 1),
                ("bin_map", (torch.uint8, torch.int16), 1), ("mask_start", (torch.int64,), 1),
                ("masks", (torch.int64,), 2), ("leaf_start", (torch.int64,), 1), ("value", (torch.float64,), 2))


def forest_leaf_masks(x: torch.Tensor, groups: torch.Tensor, columns: torch.Tensor, input_start: torch.Tensor,
                      cuts: torch.Tensor, cut_start: torch.Tensor, bin_map: torch.Tensor, mask_start: torch.Tensor,
                      masks: torch.Tensor, leaf_start: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A random forest's mean leaf value per sample, from per-tree leaf bit masks (QuickScorer's
    bit vectors, Lucchese et al., SIGIR 2015, on the boxes of each tree's own threshold grid),
    for samples of G groups with a forest of T trees each, in one call.

    Input ``p`` (of P) is column ``columns[p]`` of ``x``; group ``g`` reads inputs
    ``input_start[g] .. input_start[g + 1] - 1`` (``K_g`` of them). A value ``v`` of input ``p``
    lies in group bin ``b = #{cuts < v}`` among ``cuts[cut_start[p]:cut_start[p + 1]]`` (the
    thresholds of the group's trees on ``p``, ascending; ``v <= cut`` goes left, as in
    scikit-learn), and in bin ``u = bin_map[T * (cut_start[p] + p) + b * T + t]`` of tree ``t``.
    Segment ``s = T * input_start[g] + t * K_g + (p - input_start[g])`` (tree t, input p) has mask
    rows ``mask_start[s] .. mask_start[s + 1] - 1``; row ``mask_start[s] + u`` holds the tree's
    leaves whose box spans bin ``u`` (63 per int64 word, bit 63 unused). For sample ``n`` of
    group ``g = groups[n]`` the AND over the inputs has exactly one bit set, leaf ``l`` of tree
    ``t``; then ``out[n, c] = sum_t value[leaf_start[g * T + t] + l, c] / T``, the trees added in
    order from zero (scikit-learn's ``predict_proba`` order: the result equals it bit for bit).

    Args:
        x: float32 ``[N, M]`` inputs (finite in the columns read).
        groups: int64 ``[N]`` in ``[0, G)``.
        columns: int64 ``[P]`` in ``[0, M)``; input_start: int64 ``[G + 1]``, 0 .. P, non-decreasing.
        cuts: float32 ``[W]``; cut_start: int64 ``[P + 1]``, 0 .. W, non-decreasing.
        bin_map: uint8 or int16 ``[T * (W + P)]``.
        mask_start: int64 ``[T * P + 1]``, 0 .. R, increasing; masks: int64 ``[R, words]``
            (``1 <= words <= 64``).
        leaf_start: int64 ``[G * T + 1]``, 0 .. L, 1 to ``63 * words`` leaves per tree.
        value: float64 ``[L, C]`` leaf values (class fractions). All on one device.

    Returns: float64 ``[N, C]``. Raises ``TypeError`` (dtype) / ``ValueError`` (shape, device)
    naming the argument; the kernels raise ``RuntimeError`` on a group out of range, a
    non-finite input or corrupt tables (an offset out of range, a tree bin past the tree's bins,
    masks that do not select exactly one leaf). Built by
    ``robustops.detect.forest._LeafMasks``; reference: :func:`forest_leaf_masks_reference`.
    """
    args = (x, groups, columns, input_start, cuts, cut_start, bin_map, mask_start, masks, leaf_start, value)
    for (name, dtypes, dim), t in zip(_FOREST_ARGS, args):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if t.dim() != dim:
            raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")
    if groups.shape[0] != x.shape[0]:
        raise ValueError(f"groups must be [N] = [{x.shape[0]}], got {tuple(groups.shape)}")
    n_groups, n_inputs = input_start.shape[0] - 1, columns.shape[0]
    if n_groups < 1 or leaf_start.shape[0] - 1 < n_groups or (leaf_start.shape[0] - 1) % n_groups:
        raise ValueError(f"leaf_start must be [G * T + 1] with G = {n_groups} groups (input_start [G + 1]) and "
                         f"T >= 1, got {tuple(leaf_start.shape)}")
    t_trees = (leaf_start.shape[0] - 1) // n_groups
    if cut_start.shape[0] != n_inputs + 1:
        raise ValueError(f"cut_start must be [P + 1] = [{n_inputs + 1}], got {tuple(cut_start.shape)}")
    if bin_map.shape[0] != t_trees * (cuts.shape[0] + n_inputs):
        raise ValueError(f"bin_map must be [T * (W + P)] = [{t_trees * (cuts.shape[0] + n_inputs)}], "
                         f"got {tuple(bin_map.shape)}")
    if mask_start.shape[0] != t_trees * n_inputs + 1:
        raise ValueError(f"mask_start must be [T * P + 1] = [{t_trees * n_inputs + 1}], got {tuple(mask_start.shape)}")
    return torch.ops.robustops.forest_leaf_masks(*args)


def forest_leaf_masks_reference(x, groups, columns, input_start, cuts, cut_start, bin_map, mask_start, masks,
                                leaf_start, value):
    """Eager-PyTorch reference of :func:`forest_leaf_masks`, group by group (``searchsorted``
    for the group bins, gathers from the bin map and the masks, an AND over inputs, the leaf
    from the single set bit by testing each bit, a tree-ordered ``cumsum``)."""
    n_groups = input_start.numel() - 1
    t_trees = (leaf_start.numel() - 1) // n_groups
    words = masks.shape[1]
    out = torch.empty((x.shape[0], value.shape[1]), dtype=torch.float64, device=x.device)
    trees = torch.arange(t_trees, device=x.device)
    for g in range(n_groups):
        rows = (groups == g).nonzero().flatten()
        if rows.numel() == 0:
            continue
        p0, k = int(input_start[g]), int(input_start[g + 1] - input_start[g])
        first = leaf_start[g * t_trees:(g + 1) * t_trees]
        leaves = leaf_start[g * t_trees + 1:(g + 1) * t_trees + 1] - first
        rest = leaves[:, None] - 63 * torch.arange(words, device=x.device)[None, :]                 # [T, words]
        init = torch.where(rest >= 63, torch.full_like(rest, 2**63 - 1),
                           torch.where(rest <= 0, torch.zeros_like(rest), (1 << rest.clamp(0, 62)) - 1))
        acc = init[None].expand(rows.numel(), t_trees, words).clone()
        for f in range(k):
            p = p0 + f
            c0, c1 = int(cut_start[p]), int(cut_start[p + 1])
            v = x[rows, int(columns[p])].contiguous()
            b = torch.searchsorted(cuts[c0:c1].contiguous(), v)                                   # #{cuts < v}
            u = bin_map[t_trees * (c0 + p) + b[:, None] * t_trees + trees[None, :]].long()       # [r, T]
            seg = t_trees * p0 + trees * k + f
            acc &= masks[mask_start[seg][None, :] + u]                                           # [r, T, words]
        bit = torch.arange(63, device=x.device)
        set_ = ((acc[..., None] >> bit) & 1).bool().reshape(rows.numel(), t_trees, words * 63)
        if not bool((set_.sum(-1) == 1).all()):
            raise RuntimeError("forest_leaf_masks_reference: the masks do not select exactly one leaf")
        leaf = set_.float().argmax(-1)                                                          # [r, T]
        out[rows] = value[first[None, :] + leaf].cumsum(1)[:, -1] / t_trees
    return out


__all__ += ["forest_leaf_masks", "forest_leaf_masks_reference"]
