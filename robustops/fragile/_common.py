"""Shared helpers of robustops.fragile: layer lookup, checked data batches, layer-output capture.

Input rules are the package's (:mod:`robustops._checks`): images ``[N, ...]`` finite in
``[lo, hi]``, labels of any integer dtype (converted to int64 once), model outputs through
:func:`robustops._checks.as_logits`. Every public entry point runs under :func:`public_entry`,
which leaves ``torch.inference_mode`` for the call so that results equal a plain call.
"""
from __future__ import annotations

import functools
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .._checks import (EmptyDataError, as_pair as _shared_as_pair, check_bounds, check_images, check_int,
                       check_labels, iter_batches as _shared_iter_batches)
from .errors import LayerNotFoundError, NotAConvLayerError, SplitIndexError

LayerLike = Union[str, nn.Module]

__all__ = ["LayerLike", "resolve_layer", "conv_layer_names", "checked_batches", "checked_pair",
           "public_entry", "layer_output", "spearman", "check_batch_size", "normal_tensor", "split_indices"]


def public_entry(fn):
    """Run ``fn`` outside ``torch.inference_mode`` (the caller's mode is restored on return).

    Under inference mode, tensors made by the analysis would be inference tensors: no version
    counter (needed to detect in-place ops), no autograd, and model copies whose parameters can
    no longer be differentiated. Leaving inference mode for the call makes every result equal to
    a plain call's."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a normal copy when it is an inference tensor (in-place ops and autograd
    refuse inference tensors outside inference mode)."""
    if isinstance(t, torch.Tensor) and t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def resolve_layer(model: nn.Module, layer: LayerLike = None) -> Tuple[str, nn.Conv2d]:
    """``(name, module)`` of a conv layer given by name, by module, or None (the first Conv2d)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layer is None:
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                return name, m
        raise LayerNotFoundError("model has no nn.Conv2d layer")
    if isinstance(layer, str):
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise LayerNotFoundError(f"layer {layer!r} not found in the model; its conv layers are {convs}") from None
        name = layer
    elif isinstance(layer, nn.Module):
        name = next((n for n, m in model.named_modules() if m is layer), None)
        if name is None:
            raise LayerNotFoundError(f"the {type(layer).__name__} module passed as layer is not part of the model")
        module = layer
    else:
        raise TypeError(f"layer must be a module name (str), a module or None, got {type(layer).__name__}")
    if not isinstance(module, nn.Conv2d):
        raise NotAConvLayerError(f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d")
    return name, module


def conv_layer_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def checked_batches(data, batch_size: int, lo: float = 0.0, hi: float = 1.0, name: str = "data",
                    num_classes: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Non-empty ``(x, y)`` batches of ``data`` (an ``(x, y)`` pair or a DataLoader), each checked
    by the shared rules: x finite in ``[lo, hi]``, y integer class indices (int64 out).

    An ``(x, y)`` pair with 0 examples raises :class:`EmptyDataError`; empty batches of a loader
    are skipped (the caller raises when nothing was seen)."""
    pair = (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)
            and isinstance(data[1], torch.Tensor))
    if pair and data[0].dim() >= 1 and data[0].shape[0] == 0:
        raise EmptyDataError(f"{name} is empty (0 examples)")
    for x, y in _shared_iter_batches(data, batch_size, name):
        if x.dim() >= 1 and x.shape[0] == 0:
            continue
        x = check_images(normal_tensor(x), lo, hi, name=f"{name}: x")
        y = check_labels(normal_tensor(y), x.shape[0], name=f"{name}: y", num_classes=num_classes)
        yield x, y


def checked_pair(data, batch_size: int = 1024, lo: float = 0.0, hi: float = 1.0, name: str = "data"
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """All of ``data`` as one checked ``(x, y)`` pair (:class:`EmptyDataError` when empty)."""
    x, y = _shared_as_pair(data, batch_size, name)
    x = check_images(normal_tensor(x), lo, hi, name=f"{name}: x")
    y = check_labels(normal_tensor(y), x.shape[0], name=f"{name}: y")
    return x, y


def split_indices(split, num_kernels: int, layer_name: str = "layer", require_fragile: bool = True,
                  require_null: bool = True, labels: Tuple[str, str] = ("S (fragile)", "S' (null)")
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(S, S')`` as int64 index tensors, checked against the layer's ``num_kernels``.

    ``split``: a :class:`~robustops.fragile.FragileSplit` or an ``(S, S')`` pair of index
    sequences/tensors. Raises :class:`SplitIndexError` for non-integer, negative (no wrap-around),
    out-of-range or repeated indices and for a kernel in both sets; :class:`EmptySplitError` when
    S' (or, with ``require_fragile``, S) is empty."""
    from .errors import EmptySplitError

    if hasattr(split, "fragile") and hasattr(split, "null"):  # a FragileSplit (duck-typed: no import cycle)
        parts = (split.fragile, split.null)
    else:
        try:
            parts = tuple(split)
        except TypeError:
            raise TypeError(f"split must be a FragileSplit or a (fragile, null) pair of index lists, "
                            f"got {type(split).__name__}") from None
        if len(parts) != 2:
            raise TypeError(f"split must be a FragileSplit or a (fragile, null) pair, got {len(parts)} items")
    out = []
    for label, part in zip(labels, parts):
        t = part if isinstance(part, torch.Tensor) else torch.as_tensor(list(part) if not isinstance(part, int)
                                                                           else [part])
        if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise SplitIndexError(f"{label} must hold integer kernel indices, got dtype {t.dtype}")
        t = t.reshape(-1).long().cpu()
        if t.numel():
            lo_i, hi_i = int(t.min()), int(t.max())
            if lo_i < 0 or hi_i >= num_kernels:
                raise SplitIndexError(f"{label} indices must be in [0, {num_kernels}) for layer {layer_name!r} "
                                      f"(negative indices do not wrap), got values in [{lo_i}, {hi_i}]")
            if t.unique().numel() != t.numel():
                raise SplitIndexError(f"{label} holds a kernel index more than once: {t.tolist()}")
        out.append(t)
    s, sn = out
    both = set(s.tolist()) & set(sn.tolist())
    if both:
        raise SplitIndexError(f"kernels {sorted(both)} are in both S and S'")
    if (require_null and sn.numel() == 0) or (require_fragile and s.numel() == 0):
        raise EmptySplitError(f"S' must be non-empty{' and so must S' if require_fragile else ''}, "
                              f"got |S|={s.numel()}, |S'|={sn.numel()}")
    return s, sn


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of ``layer`` for input ``x`` (a copy); the forward pass is cut right after the layer."""
    box = []

    def hook(_m, _inp, out):
        box.append(out.clone() if isinstance(out, torch.Tensor) else out)
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError("the layer was not called during the model's forward pass")
    return box[0]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import spearmanr

    a = a.detach().double().cpu().numpy()
    b = b.detach().double().cpu().numpy()
    if a.size < 2 or (a == a[0]).all() or (b == b[0]).all():
        return float("nan")
    return float(spearmanr(a, b).statistic)


def check_batch_size(batch_size) -> int:
    return check_int(batch_size, "batch_size", 1)


def bounds(lo, hi) -> Tuple[float, float]:
    return check_bounds(lo, hi)


def true_median(t: torch.Tensor) -> float:
    """The statistical median of the values of ``t``: the middle value for an odd count, the mean of
    the two middle values for an even count (``numpy.median``). ``torch.median`` returns the
    *lower* middle value instead, which is not the statistic meant in Gavish-Donoho's threshold
    or the median split rule."""
    v = t.detach().reshape(-1).double()
    if v.numel() == 0:
        raise ValueError("median of an empty tensor")
    return float(torch.quantile(v, 0.5))
