"""Composites: tables that map layer types (and the first linear layer) to LRP rules.

A :class:`Composite` holds ``first_map`` (tried, in order, on the first layer of the forward pass
whose type it lists, "first by graph position": the first such layer *executed*, e.g. ``conv1``
after a ``Shift``) and ``layer_map`` (tried in order on every layer). Rules registered with
:func:`register_rule` come first in every composite; the shared base table below comes last.

Named composites (``get_composite(name, **overrides)``):

==================  ===============================================  ===========================
name                rules                                            reference
==================  ===============================================  ===========================
zero                LRP-0 on every linear layer (and unstabilised    Bach et al. 2015
                    Norm on sums/average pools)
epsilon             epsilon (default 1e-6) on every linear layer     Bach et al. 2015
epsilon_plus_flat   flat on the first layer, z-plus on convolutions,  Zennit 1.0 ``EpsilonPlusFlat``
                    epsilon 1e-6 on dense layers (stabilisers 1e-6)
preset_a_flat       flat on the first layer, alpha1-beta0 on          iNNvestigate
                    convolutions, epsilon 0.1 on dense layers          ``LRPSequentialPresetAFlat``
                    (stabilisers 1e-7, Keras' epsilon)
==================  ===============================================  ===========================

Base table (every composite): activations -> :class:`Pass`; average pooling and the residual
:class:`~robustops.xai.canonizers.Sum` -> :class:`Norm`; max-pooling, flatten, identity, dropout,
``robustops.nn.Shift`` -> :class:`Gradient` (plain autograd: max-pooling sends the relevance to
the winning input, as iNNvestigate and Zennit do); a BatchNorm that could not be folded into the
preceding layer -> :class:`Pass`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

from torch import nn

from ..nn.activations import BoundedReLU
from ..nn.variants import Shift
from .canonizers import Sum
from .rules import AlphaBeta, Epsilon, Flat, Gradient, Norm, Pass, Rule, Zero, ZPlus

__all__ = ["Composite", "get_composite", "register_rule", "unregister_rule", "COMPOSITES",
           "LINEAR_TYPES", "CONV_TYPES", "DENSE_TYPES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DENSE_TYPES = (nn.Linear,)
LINEAR_TYPES = CONV_TYPES + DENSE_TYPES

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Hardshrink, nn.Softshrink,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, BoundedReLU,
)
_SUM_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveAvgPool3d, Sum)
_GRADIENT = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
             nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d,
             nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, Shift)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

TypeSpec = Union[Type[nn.Module], Tuple[Type[nn.Module], ...]]
LayerMap = List[Tuple[TypeSpec, Rule]]


def _base_map(stabilizer: float = 1e-6) -> LayerMap:
    return [(_ACTIVATIONS, Pass()), (_SUM_POOL, Norm(stabilizer)), (_GRADIENT, Gradient()), (_BATCHNORM, Pass())]


# user rules: consulted first by every composite
_USER_RULES: Dict[type, Rule] = {}


def register_rule(layer_type: Type[nn.Module], rule: Rule) -> None:
    """Use ``rule`` for every module of ``layer_type`` (subclasses included) in every composite.

    For a parameter-free layer: ``Pass()`` (shape-preserving), ``Norm()`` (sum-like) or
    ``Gradient()`` (reshapes, max-like selection); or a subclass of :class:`~robustops.xai.rules.Rule`
    implementing ``relevance(module, inputs, output, R) -> tuple``. A subclass of ``nn.Linear`` /
    ``nn.ConvNd`` whose forward is the plain linear map can take the linear rules.

    Raises:
        TypeError: ``layer_type`` is not an ``nn.Module`` subclass or ``rule`` not a ``Rule``.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a robustops.xai.rules.Rule instance, got {type(rule).__name__}")
    _USER_RULES[layer_type] = rule


def unregister_rule(layer_type: Type[nn.Module]) -> None:
    """Remove a rule added by :func:`register_rule` (no error if there is none)."""
    _USER_RULES.pop(layer_type, None)


class Composite:
    """A table of rules: ``Composite(layer_map=[(types, rule), ...], first_map=[(types, rule), ...])``.

    ``rule_for(module, ctx)`` returns the rule for ``module`` (``ctx`` is a per-pass dict holding
    whether the first layer was seen), or None when no table lists its type.
    """

    def __init__(self, layer_map: Sequence[Tuple[TypeSpec, Rule]], first_map: Sequence[Tuple[TypeSpec, Rule]] = (),
                 name: str = "custom", stabilizer: float = 1e-6):
        for types, rule in list(layer_map) + list(first_map):
            if not isinstance(rule, Rule):
                raise TypeError(f"composite entries must be (types, Rule) pairs, got rule {rule!r}")
        self.layer_map: LayerMap = list(layer_map)
        self.first_map: LayerMap = list(first_map)
        self.base_map: LayerMap = _base_map(stabilizer)
        self.name = name

    def rule_for(self, module: nn.Module, ctx: dict) -> Optional[Rule]:
        for t in type(module).__mro__:
            if t in _USER_RULES:
                return _USER_RULES[t]
        if not ctx.get("first_done", False):
            for types, rule in self.first_map:
                if isinstance(module, types):
                    ctx["first_done"] = True
                    return rule
        for table in (self.layer_map, self.base_map):
            for types, rule in table:
                if isinstance(module, types):
                    return rule
        return None

    def __repr__(self) -> str:
        return f"Composite({self.name!r})"


def _zero() -> Composite:
    return Composite([(LINEAR_TYPES, Zero())], name="zero", stabilizer=0.0)


def _epsilon(epsilon: float = 1e-6) -> Composite:
    return Composite([(LINEAR_TYPES, Epsilon(epsilon))], name="epsilon")


def _epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    return Composite([(CONV_TYPES, ZPlus(stabilizer)), (DENSE_TYPES, Epsilon(epsilon))],
                     first_map=[(LINEAR_TYPES, Flat(stabilizer))], name="epsilon_plus_flat", stabilizer=stabilizer)


def _preset_a_flat(epsilon: float = 0.1, stabilizer: float = 1e-7) -> Composite:
    return Composite([(CONV_TYPES, AlphaBeta(1.0, 0.0, stabilizer)), (DENSE_TYPES, Epsilon(epsilon))],
                     first_map=[(LINEAR_TYPES, Flat(stabilizer))], name="preset_a_flat", stabilizer=stabilizer)


COMPOSITES = {
    "zero": _zero,
    "epsilon": _epsilon,
    "epsilon_plus_flat": _epsilon_plus_flat,
    "preset_a_flat": _preset_a_flat,
}


def get_composite(composite: Union[str, Composite] = "preset_a_flat", **overrides) -> Composite:
    """A :class:`Composite` by name (``overrides``: e.g. ``epsilon=0.25``) or the object itself.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        TypeError: neither a str nor a Composite, or an override the composite does not take.
    """
    if isinstance(composite, Composite):
        if overrides:
            raise TypeError("overrides apply to named composites only")
        return composite
    if not isinstance(composite, str):
        raise TypeError(f"composite must be a name or a Composite, got {type(composite).__name__}")
    key = composite.strip().lower().replace("-", "_")
    if key not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}; valid names: {', '.join(sorted(COMPOSITES))}")
    return COMPOSITES[key](**overrides)
