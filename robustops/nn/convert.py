"""``compactify(model)``: swap every nn.Conv2d / nn.Linear for its compact twin, weights copied.

What carries over from each converted layer (and what does not):

* every parameter's value and ``requires_grad`` (a frozen bias stays frozen), the ``training``
  flag, device and dtype;
* module identity: a layer used at several places of the model (shared weights) is converted once
  and the new layer is shared the same way (the parameter count is preserved);
* hooks: forward, forward-pre and full-backward hooks registered on the layer are **kept** (moved
  to the new layer, in order; the handles returned by ``register_*_hook`` on the old layer no
  longer remove them, and a hook registered on the old layer after the call has no effect);
* weight normalisation: ``torch.nn.utils.parametrizations.weight_norm`` (any
  ``torch.nn.utils.parametrize`` parametrization of ``weight``/``bias``) and the legacy
  ``torch.nn.utils.weight_norm`` are re-applied to the new layer with the same underlying tensors
  (``original0``/``original1`` resp. ``weight_g``/``weight_v``), so the function is the same;
* subclasses of ``nn.Conv2d`` / ``nn.Linear`` other than parametrized ones (user classes that may
  override ``forward``) are **not** converted by default: a ``UserWarning`` names each one;
  ``subclasses=True`` converts them too (their extra behaviour is then lost).

Compact layers reuse their output in backward, so an in-place op on that output (``ReLU(inplace=
True)`` right after, as in torchvision's VGG) would make ``backward`` fail later with an autograd
message. ``compactify`` traces the converted model (``torch.fx``; for untraceable models it looks
at ``nn.Sequential`` neighbours) and warns, naming the layer and the in-place consumer;
``inplace="fix"`` instead switches those consumers' ``inplace`` flag off (on the converted copy).
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .compact import CompactConv2d, CompactLinear

__all__ = ["compactify"]

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _legacy_weight_norm(m: nn.Module):
    """The legacy ``torch.nn.utils.weight_norm`` hook object on ``m`` (or None)."""
    try:
        from torch.nn.utils.weight_norm import WeightNorm
    except ImportError:  # pragma: no cover - removed in some future torch
        return None
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return hook
    return None


def _base_type(m: nn.Module) -> type:
    return parametrize.type_before_parametrizations(m)


def _effective(m: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The tensor the layer computes with (the parametrized / weight-normed value)."""
    legacy = _legacy_weight_norm(m)
    if legacy is not None and legacy.name == name:
        return legacy.compute_weight(m).detach()
    t = getattr(m, name)
    return None if t is None else t.detach()


def _copy_state(old: nn.Module, new: nn.Module) -> None:
    """Values, requires_grad, parametrizations, legacy weight norm, hooks, training flag."""
    legacy = _legacy_weight_norm(old)
    with torch.no_grad():
        new.weight.copy_(_effective(old, "weight"))
        if old.bias is not None:
            new.bias.copy_(_effective(old, "bias"))
    if parametrize.is_parametrized(old):
        for name, plist in old.parametrizations.items():
            for p in plist:
                parametrize.register_parametrization(new, name, copy.deepcopy(p), unsafe=True)
            src, dst = plist, new.parametrizations[name]
            for attr in [a for a in dir(src) if a.startswith("original")]:
                a_src, a_dst = getattr(src, attr), getattr(dst, attr, None)
                if isinstance(a_src, torch.Tensor) and isinstance(a_dst, torch.Tensor):
                    with torch.no_grad():
                        a_dst.copy_(a_src)
                    a_dst.requires_grad_(a_src.requires_grad)
    elif legacy is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notice for the legacy API
            torch.nn.utils.weight_norm(new, name=legacy.name, dim=legacy.dim)
        for suffix in ("_g", "_v"):
            src = getattr(old, legacy.name + suffix)
            dst = getattr(new, legacy.name + suffix)
            with torch.no_grad():
                dst.copy_(src)
            dst.requires_grad_(src.requires_grad)
    if not parametrize.is_parametrized(old) and legacy is None:
        new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None and not (parametrize.is_parametrized(old, "bias")
                                     or (legacy is not None and legacy.name == "bias")):
        new.bias.requires_grad_(old.bias.requires_grad)
    # hooks (the legacy weight-norm pre-hook was re-created above, not copied)
    for attr in _HOOK_DICTS:
        src = getattr(old, attr, None)
        dst = getattr(new, attr, None)
        if src is None or dst is None:
            continue
        for key, fn in src.items():
            if attr == "_forward_pre_hooks" and legacy is not None and fn is legacy:
                continue
            dst[key] = fn
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook
    new.train(old.training)


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works with the legacy ``weight_norm`` (whose computed, non-leaf
    ``weight`` attribute torch refuses to deep-copy): that attribute is set aside during the copy
    and put back (the same tensor) on the original; the copy recomputes it."""
    held = []
    for m in model.modules():
        wn = _legacy_weight_norm(m)
        if wn is not None and wn.name in m.__dict__:
            held.append((m, wn.name, m.__dict__.pop(wn.name)))
    try:
        new = copy.deepcopy(model)
    finally:
        for m, name, t in held:
            m.__dict__[name] = t
    for m in new.modules():
        wn = _legacy_weight_norm(m)
        if wn is not None and wn.name not in m.__dict__:
            setattr(m, wn.name, wn.compute_weight(m))
    return new


def _compact_conv_from(m: nn.Conv2d, alpha: float, delta: float, learn_alpha: bool) -> CompactConv2d:
    w = _effective(m, "weight")
    new = CompactConv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
        m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype,
        alpha=alpha, delta=delta, learn_alpha=learn_alpha,
    )
    _copy_state(m, new)
    return new


def _compact_linear_from(m: nn.Linear, alpha: float, delta: float, learn_alpha: bool) -> CompactLinear:
    w = _effective(m, "weight")
    new = CompactLinear(
        m.in_features, m.out_features, m.bias is not None, device=w.device, dtype=w.dtype,
        alpha=alpha, delta=delta, learn_alpha=learn_alpha,
    )
    _copy_state(m, new)
    return new


def _is_inplace_node(node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_function":
        if node.kwargs.get("inplace", False):
            return True
        name = getattr(node.target, "__name__", "")
        return node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv) or \
            (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    return False


def _inplace_consumers(root: nn.Module, converted: set) -> List[Tuple[str, str, object]]:
    """``(layer name, consumer description, consumer module or None)`` for in-place consumers of
    the converted layers' outputs."""
    found = []

    class _Tracer(torch.fx.Tracer):
        # compact layers are leaves: tracing into them would run their checks (and the user's
        # hooks) on proxies
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return id(m) in converted or isinstance(m, (CompactConv2d, CompactLinear)) \
                or super().is_leaf_module(m, qualname)

    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in root.modules() if id(m) not in converted)
    try:
        if hooked:  # tracing would call those hooks with proxies: use the structural scan instead
            raise RuntimeError("hooks")
        graph = _Tracer().trace(root)
        gm = torch.fx.GraphModule(root, graph)
    except Exception:  # noqa: BLE001 - untraceable: look at Sequential neighbours only
        for pname, parent in root.named_modules():
            if isinstance(parent, nn.Sequential):
                kids = list(parent.named_children())
                for (n1, c1), (n2, c2) in zip(kids, kids[1:]):
                    if id(c1) in converted and getattr(c2, "inplace", False):
                        found.append((f"{pname}.{n1}".lstrip("."), f"{pname}.{n2}".lstrip("."), c2))
        return found
    modules = dict(gm.named_modules())
    real = dict(root.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or id(modules.get(node.target)) not in converted:
            continue
        # follow views (flatten/reshape/view) to the first real consumer
        frontier = list(node.users)
        while frontier:
            u = frontier.pop()
            if _is_inplace_node(u, modules):
                mod = real.get(u.target) if u.op == "call_module" else None
                desc = str(u.target) if u.op == "call_module" else f"{u.name} ({getattr(u.target, '__name__', u.target)})"
                found.append((str(node.target), desc, mod))
            elif (u.op == "call_method" and u.target in ("view", "reshape", "flatten", "view_as", "squeeze",
                                                           "unsqueeze", "transpose", "permute"))\
                    or (u.op == "call_function" and u.target in (torch.flatten, torch.reshape)) \
                    or (u.op == "call_module" and isinstance(modules.get(u.target), (nn.Flatten, nn.Identity))):
                frontier.extend(u.users)
    return found


def compactify(model: nn.Module, *, conv: bool = True, linear: bool = True, alpha: float = 1.0,
               delta: float = 0.01, learn_alpha: bool = True, inplace: bool = False, subclasses: bool = False,
               inplace_ops: str = "warn") -> nn.Module:
    """Return ``model`` with every ``nn.Conv2d`` (if ``conv``) and ``nn.Linear`` (if ``linear``)
    replaced by :class:`CompactConv2d` / :class:`CompactLinear` with the same hyper-parameters and
    copied weights. Layers that already are compact (or L2-softmax heads) are left alone. Works on a
    deep copy unless ``inplace=True``; the model passed in is then left unchanged. A bare Conv2d /
    Linear passed as ``model`` is converted too.

    See the module docstring for what carries over: parameter values and ``requires_grad``,
    shared layers (converted once, still shared), forward/backward hooks (kept), weight
    normalisation (re-applied). Subclasses of Conv2d/Linear are skipped with a ``UserWarning``
    unless ``subclasses=True``. ``inplace_ops``: what to do when a converted layer's output feeds
    an in-place op (whose later ``backward`` would fail): ``"warn"`` (default, a ``UserWarning``
    naming both), ``"raise"`` (``ValueError``) or ``"fix"`` (turn the consumer's ``inplace`` flag
    off in the converted model; in-place functions/methods still warn).

    Note: a compact layer normalises its input patches, so the converted model computes a different
    function; the copied weights are a starting point for (re-)training, not an equivalent model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if inplace_ops not in ("warn", "raise", "fix"):
        raise ValueError(f"inplace_ops must be 'warn', 'raise' or 'fix', got {inplace_ops!r}")
    from .l2softmax import L2SoftmaxLinear

    skip = (CompactConv2d, CompactLinear, L2SoftmaxLinear)
    memo: Dict[int, Tuple[nn.Module, Optional[nn.Module]]] = {}  # id(old) -> (old kept alive, new)
    converted: set = set()

    def convert(m: nn.Module) -> Optional[nn.Module]:
        if id(m) in memo:
            return memo[id(m)][1]
        new = None
        if not isinstance(m, skip):
            base = _base_type(m)
            for enabled, cls, build in ((conv, nn.Conv2d, _compact_conv_from), (linear, nn.Linear, _compact_linear_from)):
                if not enabled or not isinstance(m, cls):
                    continue
                if base is not cls and not subclasses:
                    warnings.warn(f"compactify: {type(m).__name__} is a subclass of nn.{cls.__name__} and was left "
                                  "as it is (it may override forward); pass subclasses=True to convert it",
                                  UserWarning, stacklevel=3)
                    break
                if isinstance(getattr(m, "weight", None), nn.parameter.UninitializedParameter):
                    warnings.warn(f"compactify: lazy {type(m).__name__} is not initialised yet and was left as it is",
                                  UserWarning, stacklevel=3)
                    break
                new = build(m, alpha, delta, learn_alpha)
                converted.add(id(new))
                break
        memo[id(m)] = (m, new)
        return new

    with torch.inference_mode(False):
        root = model if inplace else _deepcopy(model)
    top = convert(root)
    if top is not None:
        return top

    def recurse(parent: nn.Module, seen: set):
        if id(parent) in seen:
            return
        seen.add(id(parent))
        for name, child in list(parent._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
            else:
                recurse(child, seen)

    recurse(root, set())
    if converted:
        bad = _inplace_consumers(root, converted)
        if bad:
            left = []
            for layer, consumer, mod in bad:
                if inplace_ops == "fix" and mod is not None and hasattr(mod, "inplace"):
                    mod.inplace = False
                else:
                    left.append((layer, consumer))
            if left:
                msg = ("compactify: the output of a compact layer is modified in place by the next op ("
                       + "; ".join(f"{lay} -> {con}" for lay, con in left)
                       + "); compact layers reuse their output in backward, so training would fail with an "
                         "autograd error. Use inplace=False on those ops (or compactify(..., inplace_ops='fix')).")
                if inplace_ops == "raise":
                    raise ValueError(msg)
                warnings.warn(msg, UserWarning, stacklevel=2)
    return root
