"""LRP rules as small classes (Bach et al. 2015; Montavon et al. 2017, 2019).

A rule turns the relevance ``R`` of a layer's output into the relevance of its input(s). All rules
run on one mechanism (:mod:`robustops.xai.core`): a forward hook replaces the layer's output by the
same values wrapped in an autograd node whose backward calls ``rule.relevance(...)``. A plain
backward pass from the target logit then *is* the LRP pass.

Linear rules (``kind = "linear"``) see the layer as ``z = c * (W . x) + b``
(:class:`~robustops.xai.layers.LinearMap`) and compute, with ``s = R / stab(z_modified)``,
``R_in = x_modified * (W_modified^T . s)``. Module rules (``kind = "module"``) see the module itself.

Bias convention (as Zennit 1.0 and iNNvestigate's default ``bias=True``): the bias is part of the
denominator ``z`` (LRP-0, epsilon: the layer's real output; z-plus / alpha-beta: the positive part
of the bias with the positive pre-activations, the negative part with the negative ones), and no
relevance is sent to it. The relevance a bias "explains" is therefore absorbed: totals are
conserved exactly only by bias-free layers (and, for epsilon, only up to the stabiliser). Why:
``z`` is then the true (or sign-split true) pre-activation, so LRP-0 equals gradient x input on
ReLU networks and epsilon-LRP's relevances are proportional to each input's share of the real
output; distributing bias relevance to the inputs would credit them with a constant they do not
cause. Flat and w-square ignore the bias (Montavon et al. 2017).

Stabiliser: ``stab(z) = z + eps * sign(z)`` with ``sign(0) = +1`` (Zennit's and iNNvestigate's).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from .layers import LinearMap

__all__ = [
    "Rule", "LinearRule", "ModuleRule", "stabilize",
    "Zero", "Epsilon", "AlphaBeta", "ZPlus", "Flat", "WSquare", "Pass", "Norm", "Gradient",
]


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``."""
    if eps == 0:
        return z
    return z + ((z == 0).to(z.dtype) + z.sign()) * eps


def _safe_div(r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``r / z`` with 0 where ``z == 0`` (LRP-0's convention for dead units)."""
    zero = z == 0
    return torch.where(zero, torch.zeros_like(r), r / torch.where(zero, torch.ones_like(z), z))


def _check_eps(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


class Rule:
    """Base class. Subclasses set ``kind`` and implement :meth:`relevance`.

    ``allow_reuse``: whether the rule may serve a module that runs more than once in one forward
    pass (shared weights). Linear rules refuse by default: the composite assigns rules per module
    (the first layer, a following BatchNorm), which is ambiguous for a module at two graph
    positions. Pass ``allow_reuse=True`` to a rule to accept it (each call is then explained
    separately with the same rule).
    """

    kind = "module"
    allow_reuse = False

    def relevance(self, layer, inputs: Sequence[torch.Tensor], output: torch.Tensor,
                  relevance: torch.Tensor) -> Tuple[torch.Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        keys = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in keys.items()) + ")"


class LinearRule(Rule):
    """A rule for linear layers: ``relevance(lm: LinearMap, (x,), z, R) -> (R_x,)``.

    Subclasses implement :meth:`linear` on the prepared input (padding applied)."""

    kind = "linear"

    def __init__(self, allow_reuse: bool = False):
        self.allow_reuse = bool(allow_reuse)

    def relevance(self, layer: LinearMap, inputs, output, relevance):
        x = layer.prepare(inputs[0])
        r = self.linear(layer, x, output, relevance)
        return (layer.unprepare(r),)

    def linear(self, lm: LinearMap, x: torch.Tensor, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class Epsilon(LinearRule):
    """LRP-epsilon: ``R_i = x_i * sum_j w_ji R_j / (z_j + eps * sign(z_j))``, ``z`` the layer's output
    (bias included). ``epsilon = 0`` is LRP-0 (:class:`Zero`)."""

    def __init__(self, epsilon: float = 1e-6, allow_reuse: bool = False):
        super().__init__(allow_reuse)
        self.epsilon = _check_eps(epsilon, "epsilon")

    def linear(self, lm, x, z, r):
        s = _safe_div(r, z) if self.epsilon == 0 else r / stabilize(z, self.epsilon)
        return x * lm.transpose(s, lm.weight, x.shape)


class Zero(Epsilon):
    """LRP-0: ``R_i = x_i * sum_j w_ji R_j / z_j`` (0 where ``z_j = 0``). On ReLU / max-pool
    networks with ``start="logit"`` this equals gradient x input."""

    def __init__(self, allow_reuse: bool = False):
        super().__init__(0.0, allow_reuse)


def _pos(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.clamp(min=0)


def _neg(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.clamp(max=0)


class AlphaBeta(LinearRule):
    """LRP-alpha-beta (Bach et al. 2015), ``alpha - beta = 1``:
    ``R_i = alpha * (x+_i w+_ij + x-_i w-_ij) / z+_j * R_j - beta * (x+_i w-_ij + x-_i w+_ij) / z-_j * R_j``
    with ``z+ = W+ x+ + W- x- + b+`` and ``z- = W- x+ + W+ x- + b-`` (Zennit 1.0's split; on
    non-negative inputs it is the classic ``W+ x`` / ``W- x``)."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, allow_reuse: bool = False):
        super().__init__(allow_reuse)
        self.alpha = _check_eps(alpha, "alpha")
        self.beta = _check_eps(beta, "beta")
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(f"alpha - beta must equal 1, got alpha={self.alpha}, beta={self.beta}")
        self.stabilizer = _check_eps(stabilizer, "stabilizer")

    def _part(self, lm, xp, xn, w_a, w_b, bias, r, positive):
        """``(xp * W_a^T s + xn * W_b^T s)`` with ``s = r / stab(W_a xp + W_b xn + bias)``."""
        z = lm.forward(xp, w_a, bias)
        if xn is not None:
            z = z + lm.forward(xn, w_b)
        # z+ >= 0 by construction, where stab(z) = z + eps (sign(0) = +1) exactly
        s = r / (z + self.stabilizer) if positive else r / stabilize(z, self.stabilizer)
        out = xp * lm.transpose(s, w_a, xp.shape)
        if xn is not None:
            out = out + xn * lm.transpose(s, w_b, xn.shape)
        return out

    def linear(self, lm, x, z, r):
        if bool(x.amin() < 0):
            xp, xn = x.clamp(min=0), x.clamp(max=0)
        else:  # after a ReLU: the negative half vanishes
            xp, xn = x, None
        wp, wn = _pos(lm.weight), _neg(lm.weight)
        out = self._part(lm, xp, xn, wp, wn, _pos(lm.bias), r, True)
        if self.alpha != 1.0:
            out = out * self.alpha
        if self.beta != 0:
            out = out - self.beta * self._part(lm, xp, xn, wn, wp, _neg(lm.bias), r, False)
        return out


class ZPlus(AlphaBeta):
    """LRP-z+ (Montavon et al. 2017): alpha = 1, beta = 0, i.e.
    ``R_i = (x+_i w+_ij + x-_i w-_ij) / (z+_j) * R_j``, ``z+ = W+ x+ + W- x- + b+``. Conserves
    relevance when the layer has no (positive) bias."""

    def __init__(self, stabilizer: float = 1e-6, allow_reuse: bool = False):
        super().__init__(1.0, 0.0, stabilizer, allow_reuse)


class Flat(LinearRule):
    """Flat rule (Lapuschkin et al. 2019): every connected input gets an equal share,
    ``R_i = sum_j R_j / (number of inputs of j)``; weights, bias and input values are ignored."""

    def __init__(self, stabilizer: float = 1e-6, allow_reuse: bool = False):
        super().__init__(allow_reuse)
        self.stabilizer = _check_eps(stabilizer, "stabilizer")

    def linear(self, lm, x, z, r):
        ones_w = torch.ones_like(lm.weight)
        ones_x = torch.ones((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        zf = lm.forward(ones_x, ones_w, scale_power=0)
        s = r / stabilize(zf, self.stabilizer)
        return lm.transpose(s, ones_w, x.shape, scale_power=0)


class WSquare(LinearRule):
    """w-square rule (Montavon et al. 2017): ``R_i = sum_j w_ij^2 / sum_i' w_i'j^2 * R_j``; for a
    compact layer the effective weights ``(c_p w)^2``; the bias is ignored."""

    def __init__(self, stabilizer: float = 1e-6, allow_reuse: bool = False):
        super().__init__(allow_reuse)
        self.stabilizer = _check_eps(stabilizer, "stabilizer")

    def linear(self, lm, x, z, r):
        w2 = lm.weight * lm.weight
        ones_x = torch.ones((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        if lm.scale is not None:
            ones_x = ones_x.expand_as(x)
        zs = lm.forward(ones_x, w2, scale_power=2)
        s = r / stabilize(zs, self.stabilizer)
        return lm.transpose(s, w2, x.shape, scale_power=2)


class ModuleRule(Rule):
    """A rule that works on the module itself (no weights needed)."""

    kind = "module"
    allow_reuse = True


class Pass(ModuleRule):
    """Pass-through: the input gets the output's relevance unchanged (activations, shape-preserving
    element-wise layers, an unfolded BatchNorm)."""

    def relevance(self, layer, inputs, output, relevance):
        if relevance.shape != inputs[0].shape:
            raise ValueError(f"Pass rule on {type(layer).__name__}: output shape {tuple(relevance.shape)} differs "
                             f"from input shape {tuple(inputs[0].shape)}; use Norm or Gradient instead")
        return (relevance,)


class Norm(ModuleRule):
    """Proportional redistribution through a parameter-free, positively homogeneous module
    (average pooling, a residual sum): ``R_i = x_i * d/dx_i [f(x) . (R / stab(f(x)))]`` with the
    module ``f``'s own gradient; conserves relevance when ``f`` is linear without offset."""

    def __init__(self, stabilizer: float = 1e-6):
        self.stabilizer = _check_eps(stabilizer, "stabilizer")

    def relevance(self, layer: Callable, inputs, output, relevance):
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(True) for t in inputs]
            out = layer.forward(*xs) if isinstance(layer, nn.Module) else layer(*xs)
            z = out.detach()
            s = _safe_div(relevance, z) if self.stabilizer == 0 else relevance / stabilize(z, self.stabilizer)
            grads = torch.autograd.grad(out, xs, s)
        return tuple(x.detach() * g for x, g in zip(xs, grads))


class Gradient(ModuleRule):
    """Plain autograd through the module (max-pool: winner takes all; flatten, reshape, identity,
    dropout in eval). No hook is installed: this is the marker for "nothing to do"."""

    def relevance(self, layer, inputs, output, relevance):  # pragma: no cover - never called
        raise RuntimeError("Gradient is handled by autograd, not called")
