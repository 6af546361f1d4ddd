"""The one hook mechanism every LRP rule runs on, and the LRP entry points.

Mechanism (the shape of Zennit's, written here): during the forward pass a forward hook on each
layer with a rule replaces the layer's output by the *same values* wrapped in an autograd node
(:class:`_Relay`) whose inputs are the layer's inputs and whose backward is
``rule.relevance(layer, inputs, output, R)``. The layer's own autograd graph is bypassed. A single
``torch.autograd.grad(logits, x, R_start)`` then runs the LRP backward pass, layer by layer, through
the relays (and through plain autograd for max-pooling, flatten and friends). Nothing is written
to the model: hooks are removed and canonizers undone in ``finally`` (even when the forward
raises), and everything runs under :func:`robustops._guard.frozen_model` (eval mode, frozen
parameters, flags and ``.grad`` restored).

Relevance start (``start``): ``"logit"`` puts the target logit's value on the target output
(iNNvestigate's convention: LRP-0 then equals gradient x input exactly and totals are comparable to
the logit); ``"one_hot"`` puts 1 there (Zennit attributors with a one-hot output gradient). Every
other output gets 0.
"""
from __future__ import annotations

import numbers
import threading
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .._checks import as_logits, check_labels, check_model
from .._gradients import autograd_on
from .._guard import frozen_model, model_device
from ..nn.compact import CompactConv2d, CompactLinear
from .canonizers import Canonizer, CompactAsLinear, MergeBatchNorm, default_canonizers
from .composites import Composite, get_composite
from .errors import LayerNotFoundError, SharedModuleError, UnsupportedLayerError
from .layers import can_fold, fold_batchnorm, is_linear_layer, linear_map
from .rules import Gradient, Pass, Rule

__all__ = ["lrp", "relevance_sums", "explain_pair", "lrp_signatures", "ExplanationPair", "resolve_layer"]

STARTS = ("logit", "one_hot")


class _Relay(torch.autograd.Function):
    """Identity in the forward, the rule in the backward.

    The forward returns a detached alias of the layer's output (no copy); the rule keeps another
    alias. Both share the output's version counter: if a later in-place op (``ReLU(inplace=True)``)
    overwrites the output, the backward sees the bumped version and recomputes the output
    instead of dividing by overwritten values."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        out, fn.ret = fn.ret, None
        return out

    @staticmethod
    def backward(ctx, relevance):
        fn, ctx.fn = ctx.fn, None
        return (None,) + tuple(fn(relevance))


class _RelayFn:
    """The backward of one relay: the rule on the saved (detached) inputs and output."""

    __slots__ = ("rule", "layer", "name", "ins", "out", "versions", "record", "ret")

    def __init__(self, rule, layer, name, inputs, output, record):
        self.rule, self.layer, self.name, self.record = rule, layer, name, record
        self.ins = tuple(t.detach() for t in inputs)
        self.out = output.detach()
        self.ret = output.detach()
        self.versions = tuple(t._version for t in self.ins) + (self.out._version,)

    def _output(self):
        if self.out._version == self.versions[-1]:
            return self.out
        # overwritten in place after the layer ran: recompute it from the (intact) inputs
        with torch.no_grad():
            if self.rule.kind == "linear":
                x = self.layer.prepare(self.ins[0])
                return self.layer.forward(x, self.layer.weight, self.layer.bias)
            return self.layer.forward(*self.ins)

    def __call__(self, relevance):
        if any(t._version != v for t, v in zip(self.ins, self.versions)):
            raise RuntimeError(f"the input of layer {self.name!r} was modified in place after the layer ran; "
                               "LRP needs it: use out-of-place operations there")
        rin = self.rule.relevance(self.layer, self.ins, self._output(), relevance)
        if self.record is not None:
            self.record[self.name] = sum(_batch_sum(r) for r in rin)
        return rin


_LOCKS_GUARD = threading.Lock()
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()


def _model_lock(model: nn.Module) -> threading.RLock:
    """One lock per model: hooks and canonizer patches are visible to every thread, so traced
    forward passes on the same model are serialised (the backward passes run outside the lock)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _batch_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1) if t.dim() > 1 else t


def _has_children(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is not None


def _has_own_params(m: nn.Module) -> bool:
    return next(iter(m.parameters(recurse=False)), None) is not None


class _Tracer:
    """Hooks a model for one LRP forward pass; a context manager (always cleans up)."""

    def __init__(self, model: nn.Module, composite: Composite, canonizers: Optional[Sequence[Canonizer]],
                 record: Optional[Dict[str, torch.Tensor]] = None, watch: Optional[nn.Module] = None):
        self.model = model
        self.composite = composite
        self.canonizers = default_canonizers() if canonizers is None else list(canonizers)
        for c in self.canonizers:
            if not isinstance(c, Canonizer):
                raise TypeError(f"canonizers must be Canonizer instances, got {type(c).__name__}")
        self.fold_bn = any(isinstance(c, MergeBatchNorm) for c in self.canonizers)
        self.compact = any(isinstance(c, CompactAsLinear) for c in self.canonizers)
        self.record = record
        self.watch = watch
        self.watched_input: Optional[torch.Tensor] = None
        self.linear_inputs: List[torch.Tensor] = []
        self.ctx: dict = {}
        self.rules: Dict[nn.Module, Optional[Rule]] = {}
        self.calls: Dict[nn.Module, int] = {}
        self.produced: Dict[int, tuple] = {}
        self._hooks: list = []
        self._canon: list = []

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> "_Tracer":
        self._lock = _model_lock(self.model)
        self._lock.acquire()
        self._thread = threading.get_ident()
        try:
            extra = []
            for c in self.canonizers:
                h = c.apply(self.model)
                self._canon.append(h)
                extra += h.modules
            self.names = {}
            for name, m in self.model.named_modules():
                self.names.setdefault(m, name or type(m).__name__)
            for name, m in extra:
                self.names[m] = name
            for m in self.names:
                if not _has_children(m) or _has_own_params(m):
                    self._hooks.append(m.register_forward_hook(self._hook))
            if self.watch is not None:
                self._hooks.append(self.watch.register_forward_hook(self._watch_hook))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        hooks, self._hooks = self._hooks, []
        for h in hooks:
            h.remove()
        canon, self._canon = self._canon, []
        for h in reversed(canon):
            h.remove()
        self.produced.clear()
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    # -- hooks -----------------------------------------------------------------------------
    def _watch_hook(self, module, args, output):
        if threading.get_ident() != self._thread:
            return
        if args and isinstance(args[0], torch.Tensor):
            self.watched_input = args[0]

    def _rule(self, module: nn.Module, name: str) -> Rule:
        if module in self.rules:
            return self.rules[module]
        rule = self.composite.rule_for(module, self.ctx)
        if rule is None:
            raise UnsupportedLayerError(
                f"module {name!r} ({type(module).__name__}) has no LRP rule in composite {self.composite.name!r}; "
                f"register one with robustops.xai.register_rule({type(module).__name__}, rule), e.g. "
                "rules.Pass() for an element-wise layer, rules.Norm() for a sum/average, rules.Gradient() "
                "for a reshape or selection, or a Rule subclass")
        if rule.kind == "linear":
            if not is_linear_layer(module):
                raise UnsupportedLayerError(
                    f"module {name!r} ({type(module).__name__}) got the linear rule {rule!r}, but it is not an "
                    "nn.Linear / nn.ConvNd; register a module rule for it with robustops.xai.register_rule")
            if isinstance(module, (CompactConv2d, CompactLinear)) and not self.compact:
                raise UnsupportedLayerError(
                    f"module {name!r} ({type(module).__name__}) is a compact layer: add the "
                    "robustops.xai.canonizers.CompactAsLinear() canonizer to explain it as its patch-normalised "
                    "linear map")
        self.rules[module] = rule
        return rule

    def _relay(self, rule: Rule, layer, name: str, inputs: Sequence[torch.Tensor], output: torch.Tensor):
        record = None if isinstance(rule, Pass) else self.record
        return _Relay.apply(_RelayFn(rule, layer, name, inputs, output, record), *inputs)

    def _hook(self, module: nn.Module, args, output):
        if threading.get_ident() != self._thread:  # another thread's call (e.g. a backward rule)
            return None
        name = self.names[module]
        n = self.calls.get(module, 0) + 1
        self.calls[module] = n
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        # a BatchNorm fed directly by a hooked linear layer: explain the pair as one linear map
        if (self.fold_bn and can_fold(module) and tensors and n == 1):
            entry = self.produced.get(id(tensors[0]))
            if entry is not None and entry[0] is tensors[0]:
                _, lname, lm, lrule, x = entry
                self.rules[module] = lrule
                return self._relay(lrule, fold_batchnorm(lm, module), f"{lname}+{name}", (x,), output)
        rule = self._rule(module, name)
        if n > 1 and not rule.allow_reuse:
            raise SharedModuleError(
                f"module {name!r} ({type(module).__name__}) runs {n} times in one forward pass (shared weights); "
                f"its rule {type(rule).__name__} does not allow reuse. Pass a rule built with allow_reuse=True "
                "(e.g. via a Composite or register_rule) to explain each call separately")
        if isinstance(rule, Gradient):
            return None
        if not isinstance(output, torch.Tensor) or not tensors:
            raise UnsupportedLayerError(f"module {name!r} ({type(module).__name__}) must take and return tensors "
                                        "to carry an LRP rule")
        if rule.kind == "linear":
            x = tensors[0]
            self.linear_inputs.append(x)
            lm = linear_map(module, x.detach())
            out = self._relay(rule, lm, name, (x,), output)
            self.produced[id(out)] = (out, name, lm, rule, x)
            return out
        return self._relay(rule, module, name, tensors, output)


def _check_batch(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch [N, ...] (add a batch dimension, e.g. x.unsqueeze(0)), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch size 0)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def _targets(target, logits: torch.Tensor, name: str = "target") -> torch.Tensor:
    n, c = logits.shape
    if target is None:
        return logits.argmax(1)
    if isinstance(target, torch.Tensor) and target.dim() == 0:
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or an integer tensor, got dtype {target.dtype}")
        target = int(target)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        t = int(target)
        if not 0 <= t < c:
            raise ValueError(f"{name}={t} is out of range: the model has {c} outputs (valid classes: 0..{c - 1})")
        return torch.full((n,), t, dtype=torch.long, device=logits.device)
    if isinstance(target, torch.Tensor):
        return check_labels(target, n, name, c).to(logits.device)
    raise TypeError(f"{name} must be None, an int or a tensor of class indices, got {type(target).__name__}")


def _start(logits: torch.Tensor, tgt: torch.Tensor, start: str) -> torch.Tensor:
    r0 = torch.zeros_like(logits)
    idx = tgt[:, None]
    val = logits.detach().gather(1, idx) if start == "logit" else torch.ones_like(idx, dtype=logits.dtype)
    return r0.scatter_(1, idx, val)


def _check_start(start) -> str:
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    return start


def resolve_layer(model: nn.Module, layer) -> nn.Module:
    """A submodule given by dotted name or as a module; :class:`LayerNotFoundError` otherwise."""
    if isinstance(layer, nn.Module):
        if any(m is layer for m in model.modules()):
            return layer
        raise LayerNotFoundError(f"layer {type(layer).__name__} is not a submodule of the model")
    if isinstance(layer, str):
        named = dict(model.named_modules())
        if layer in named and layer != "":
            return named[layer]
        names = [n for n in named if n]
        raise LayerNotFoundError(f"no layer named {layer!r} in the model; some valid names: {names[:12]}")
    raise TypeError(f"layer must be a module name (str) or an nn.Module, got {type(layer).__name__}")


def _run(model, x, target, composite, start, canonizers, record=None, layer=None, composite_kw=None):
    """Forward with relays, then the LRP backward. Returns (relevance at x or at ``layer``'s input,
    logits, targets)."""
    check_model(model)
    x = _check_batch(x)
    comp = get_composite(composite, **(composite_kw or {}))
    start = _check_start(start)
    watch = None if layer in (None, "input") else resolve_layer(model, layer)
    with frozen_model(model), autograd_on():
        device = model_device(model, default=x.device)
        xi = x.detach().to(device).clone().requires_grad_(True)
        with _Tracer(model, comp, canonizers, record, watch) as tr:
            out = model(xi)
        logits = as_logits(out, x.shape[0])
        tgt = _targets(target, logits)
        r0 = _start(logits, tgt, start)
        if layer is None and record is None and not tr.linear_inputs:
            raise UnsupportedLayerError("the model ran no linear layer with an LRP rule")
        if layer in (None, "input"):
            wrt = xi
        else:
            if tr.watched_input is None or not tr.watched_input.requires_grad:
                raise LayerNotFoundError(f"layer {layer!r} did not run on a tensor input in the forward pass")
            wrt = tr.watched_input
        if record is not None:
            record.clear()
            record["output"] = _batch_sum(r0)
        (r,) = torch.autograd.grad(logits, wrt, r0)
        if record is not None:
            record["input"] = _batch_sum(r)
    return r.detach(), logits.detach(), tgt


def lrp(model: nn.Module, x: torch.Tensor, target=None, composite: Union[str, Composite] = "preset_a_flat",
        start: str = "logit", *, canonizers: Optional[Sequence[Canonizer]] = None, **composite_kw) -> torch.Tensor:
    """Layer-wise relevance propagation (Bach et al. 2015) of ``model`` at ``x``.

    Args:
        model: classifier returning ``(N, C)`` logits; never modified (eval mode inside the call).
        x: input batch ``[N, ...]`` (images ``[N, C, H, W]``, pixel space, any range).
        target: class explained: None (the predicted class), an int, or ``[N]`` integer labels.
        composite: a :class:`~robustops.xai.composites.Composite` or a name: ``"preset_a_flat"``
            (iNNvestigate's ``LRPSequentialPresetAFlat``, the paper's method), ``"epsilon_plus_flat"``
            (Zennit's ``EpsilonPlusFlat``), ``"epsilon"``, ``"zero"`` (LRP-0).
        start: ``"logit"`` (relevance at the output = the target logit's value) or ``"one_hot"`` (1).
        canonizers: None (``MergeBatchNorm``, ``ResidualSum``, ``CompactAsLinear``) or a list.
        **composite_kw: overrides of a named composite (``epsilon=0.25``, ``stabilizer=...``).

    Returns:
        relevance, same shape, dtype and device as ``x``. Its per-sample sum equals the start
        relevance where the rules conserve it (see :mod:`robustops.xai.rules` on biases).

    Raises:
        TypeError / ValueError: ``x`` not a floating batch, non-finite, ``target`` out of range or
            of the wrong type, unknown composite or ``start``; :class:`UnsupportedLayerError` for a
            layer without a rule (names it and how to register one); :class:`SharedModuleError` for
            a module run twice whose rule forbids reuse.
    """
    r, _, _ = _run(model, x, target, composite, start, canonizers, composite_kw=composite_kw)
    return r.to(device=x.device, dtype=x.dtype)


def relevance_sums(model: nn.Module, x: torch.Tensor, target=None,
                   composite: Union[str, Composite] = "preset_a_flat", start: str = "logit", *,
                   canonizers: Optional[Sequence[Canonizer]] = None, **composite_kw) -> "OrderedDict[str, torch.Tensor]":
    """Per-sample relevance totals at every explained layer, from the output back to the input.

    Returns an ordered dict: ``"output"`` (the start relevance, ``[N]``), then for each layer with a
    rule, in backward order, the total relevance at its input (key: the module name; a folded
    pair is ``"conv+bn"``; a residual sum ``"<block>.residual"``), then ``"input"`` (the total of
    :func:`lrp`'s heatmap). Conservation means equal totals; arguments as :func:`lrp`.
    """
    record: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    _run(model, x, target, composite, start, canonizers, record=record, composite_kw=composite_kw)
    return OrderedDict((k, v.detach().to(x.device)) for k, v in record.items())


def lrp_signatures(model: nn.Module, x: torch.Tensor, layer=None, target=None,
                   composite: Union[str, Composite] = "preset_a_flat", start: str = "logit", *,
                   canonizers: Optional[Sequence[Canonizer]] = None, **composite_kw) -> torch.Tensor:
    """LRP signatures (Klawikowska et al. 2020, Sec. 3; after Fidel et al.'s SHAP signatures):
    the relevance at the input of ``layer``, flattened to ``[N, D]``.

    ``layer=None`` (default): the last linear layer that runs (the classifier, e.g. ``fc3`` of
    ``papernot_mnist``, ``fc`` of a ResNet): the paper applies LRP "on the last layer", so the
    signature is the relevance of each feature the last layer reads. ``layer="input"``: the input
    heatmap, flattened. A name or module: the relevance of that module's input. Only the part of
    the backward pass above ``layer`` runs.
    """
    if layer is None:
        r = _signature_last_linear(model, x, target, composite, start, canonizers, composite_kw)
    else:
        r, _, _ = _run(model, x, target, composite, start, canonizers, layer=layer, composite_kw=composite_kw)
    return r.reshape(r.shape[0], -1).to(x.device)


def _signature_last_linear(model, x, target, composite, start, canonizers, composite_kw):
    check_model(model)
    x = _check_batch(x)
    comp = get_composite(composite, **(composite_kw or {}))
    start = _check_start(start)
    with frozen_model(model), autograd_on():
        device = model_device(model, default=x.device)
        xi = x.detach().to(device).clone().requires_grad_(True)
        with _Tracer(model, comp, canonizers) as tr:
            out = model(xi)
        logits = as_logits(out, x.shape[0])
        if not tr.linear_inputs:
            raise UnsupportedLayerError("the model ran no linear layer with an LRP rule")
        tgt = _targets(target, logits)
        (r,) = torch.autograd.grad(logits, tr.linear_inputs[-1], _start(logits, tgt, start))
    return r.detach()
