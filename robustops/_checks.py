"""The one check layer every public entry point of robustops goes through.

Each rule lives here once, so attacks, the accuracy curve, ``fragile``, ``models``, ``detect``
and ``xai`` agree on it:

* **model outputs** (:func:`as_logits`): a model must return one floating ``(N, C)`` tensor of
  logits, C >= 2, all finite. HuggingFace-style outputs (an object or dict with a ``logits``
  tensor) are unwrapped, because that convention is unambiguous. Any other container (a tuple
  ``(logits, probs)``, ``(features, logits)``, a dict without ``"logits"``) is refused with an
  error that names what was returned and how to wrap the model (:class:`SelectOutput`): guessing
  which element holds the logits would silently attack the wrong thing.
* **labels** (:func:`check_labels`): any integer dtype (int8/16/32/64, uint8), 1-D, one per
  sample, in ``[0, num_classes)``; float, bool and complex labels are refused; converted once to
  int64.
* **images** (:func:`check_images`): a floating batch ``[N, ...]``, N >= 1, finite, in ``[lo, hi]``.
* **data** (:func:`iter_batches`, :func:`as_pair`): an ``(x, y)`` tensor pair or an iterable of
  ``(x, y, ...)`` batches (a ``DataLoader``).
* **scalars** (:func:`check_nonneg`, :func:`check_bounds`, :func:`check_int`).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "check_model", "check_bounds", "check_images", "check_labels", "check_nonneg", "check_int",
    "as_logits", "model_logits", "SelectOutput", "iter_batches", "as_pair", "EmptyDataError",
]

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class EmptyDataError(ValueError):
    """The data given to an analysis holds no examples."""


def check_model(model, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_bounds(lo, hi) -> Tuple[float, float]:
    """``lo`` and ``hi`` as floats with ``lo < hi``, both finite."""
    if isinstance(lo, bool) or isinstance(hi, bool):
        raise TypeError(f"lo and hi must be numbers, got lo={lo!r}, hi={hi!r}")
    try:
        lo_f, hi_f = float(lo), float(hi)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"lo and hi must be numbers, got lo={lo!r}, hi={hi!r}") from None
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)) or lo_f >= hi_f:
        raise ValueError(f"need finite lo < hi, got lo={lo_f}, hi={hi_f}")
    return lo_f, hi_f


def check_nonneg(value, name: str, *, integer: bool = False, positive: bool = False):
    """A finite number >= 0 (> 0 when ``positive``); an int when ``integer``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if integer and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    return int(value) if integer else float(value)


def check_int(value, name: str, minimum: int = 1) -> int:
    """An ``int`` (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_images(x, lo: float = 0.0, hi: float = 1.0, name: str = "x") -> torch.Tensor:
    """Validate an input batch: floating tensor ``[N, ...]``, N >= 1, finite, within ``[lo, hi]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must be a batch [N, ...] with at least 2 dimensions, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch size 0)")
    # one pass: NaN propagates into both extremes and an infinity is an extreme
    xmin, xmax = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(xmin) and math.isfinite(xmax)):
        raise ValueError(f"{name} contains NaN or Inf values")
    if xmin < lo or xmax > hi:
        raise ValueError(
            f"{name} must lie in [lo, hi] = [{lo}, {hi}], got values in [{xmin:.6g}, {xmax:.6g}] "
            "(robustops works in pixel space: put normalisation inside the model, or pass lo/hi)"
        )
    return x


def check_labels(y, n: Optional[int] = None, name: str = "y", num_classes: Optional[int] = None) -> torch.Tensor:
    """Validate class labels and return them as int64 (one conversion, here).

    Accepts a 1-D tensor of any integer dtype (``uint8``, ``int8``, ``int16``, ``int32``,
    ``int64``) with ``n`` entries in ``[0, num_classes)``. Raises ``TypeError`` for non-tensors,
    float, bool and complex labels; ``ValueError`` for a wrong shape or an out-of-range class.
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(y.shape)}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"shape mismatch: x has {n} samples but {name} has {y.shape[0]}")
    y = y.long()
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise ValueError(f"{name} must hold class indices >= 0, got min {lo}")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"{name} holds class {hi} but the model has {num_classes} outputs "
                             f"(valid classes: 0..{num_classes - 1})")
    return y


class SelectOutput(nn.Module):
    """Wrap a model whose ``forward`` returns a container so that it returns the logits tensor.

    ``SelectOutput(net, 0)`` for ``(logits, probs)``; ``SelectOutput(net, "out")`` for a dict;
    ``SelectOutput(net, lambda out: out.scores)`` for anything else. The wrapped model's
    parameters are the original's (no copy).
    """

    def __init__(self, model: nn.Module, key):
        super().__init__()
        self.model = check_model(model)
        if not (isinstance(key, (int, str)) or callable(key)):
            raise TypeError(f"key must be an int index, a str key or a callable, got {type(key).__name__}")
        self.key = key

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if callable(self.key) and not isinstance(self.key, (int, str)):
            return self.key(out)
        return out[self.key]


def _describe(out) -> str:
    if isinstance(out, dict):
        return f"a dict with keys {list(out)[:8]}"
    if isinstance(out, (tuple, list)):
        kinds = ", ".join(f"Tensor{tuple(o.shape)}" if isinstance(o, torch.Tensor) else type(o).__name__ for o in out[:4])
        return f"a {type(out).__name__} of {len(out)} items ({kinds})"
    return f"a {type(out).__name__}"


def as_logits(output, n: Optional[int] = None, *, name: str = "model", batch_dims: int = 1,
              check_finite: bool = True) -> torch.Tensor:
    """Turn a model's output into its ``(N, C)`` logits tensor, or raise an error naming the problem.

    The rule (the same for every robustops entry point that runs a model):

    * a floating tensor of shape ``(*batch, C)`` with ``batch_dims`` leading batch dimensions
      (``(N, C)`` normally), ``C >= 2``, ``N == n`` when ``n`` is given: returned as is;
    * an object with a tensor attribute ``logits`` or a dict with key ``"logits"`` (HuggingFace
      ``ImageClassifierOutput`` and friends): that tensor;
    * anything else (tuples, lists, other dicts, scalars): ``ValueError`` naming what came back
      and suggesting ``robustops.SelectOutput(model, index_or_key)``.

    Non-finite logits raise ``ValueError`` (an attack on NaN logits silently returns garbage)
    unless ``check_finite=False``.
    """
    out = output
    if not isinstance(out, torch.Tensor):
        inner = None
        if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
            inner = out["logits"]
        elif not isinstance(out, (tuple, list, dict)) and isinstance(getattr(out, "logits", None), torch.Tensor):
            inner = out.logits
        if inner is None:
            raise ValueError(
                f"{name} must return one (N, C) logits tensor, but it returned {_describe(out)}; "
                f"wrap it, e.g. robustops.SelectOutput({name}, 0) to use the first element")
        out = inner
    if not out.is_floating_point():
        raise ValueError(f"{name} must return floating-point logits, got dtype {out.dtype}")
    want = batch_dims + 1
    if out.dim() != want or out.shape[-1] < 2 or (n is not None and out.shape[batch_dims - 1] != n):
        shape = ("(N, C)" if batch_dims == 1 else f"({'B, ' * (batch_dims - 1)}N, C)")
        raise ValueError(f"{name} must return {shape} logits with " + (f"N={n} and " if n is not None else "")
                         + f"C >= 2 classes, got shape {tuple(out.shape)}")
    if check_finite and not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} returned NaN or Inf logits (check the model and its input)")
    return out


def model_logits(model: nn.Module, x: torch.Tensor, *, name: str = "model", check_finite: bool = True) -> torch.Tensor:
    """``as_logits(model(x), x.shape[0])``: run the model and apply the output rule."""
    return as_logits(model(x), x.shape[0], name=name, check_finite=check_finite)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)
            and isinstance(data[1], torch.Tensor))


def iter_batches(data, batch_size: int, name: str = "data") -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of an ``(x, y)`` tensor pair (split into ``batch_size`` chunks) or
    of a ``DataLoader`` / iterable of ``(x, y, ...)`` batches. Checks structure, not values."""
    check_int(batch_size, "batch_size")
    if _is_pair(data):
        x, y = data
        if x.dim() < 2:
            raise ValueError(f"{name}: x must be a batch [N, ...], got shape {tuple(x.shape)}")
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(f"{name}: shape mismatch, x has {x.shape[0]} samples but y has shape {tuple(y.shape)}")
        for s in range(0, x.shape[0], batch_size):
            yield x[s:s + batch_size], y[s:s + batch_size]
        return
    if isinstance(data, (torch.Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a DataLoader (or iterable of (x, y) batches) or an (x, y) tensor pair, "
                        f"got {type(data).__name__}")
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"{name}: batch {i} must be an (x, y, ...) tuple, got {type(batch).__name__}")
        if not isinstance(batch[0], torch.Tensor) or not isinstance(batch[1], torch.Tensor):
            raise TypeError(f"{name}: batch {i} must hold tensors, got ({type(batch[0]).__name__}, "
                            f"{type(batch[1]).__name__})")
        yield batch[0], batch[1]


def as_pair(data, batch_size: int = 1024, name: str = "data") -> Tuple[torch.Tensor, torch.Tensor]:
    """All of ``data`` as one ``(x, y)`` pair; :class:`EmptyDataError` when it holds no example."""
    if _is_pair(data):
        x, y = data
    else:
        xs, ys = [], []
        for x, y in iter_batches(data, batch_size, name):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise EmptyDataError(f"{name} yielded no examples")
        x, y = torch.cat(xs), torch.cat(ys)
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be a batch [N, ...], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise EmptyDataError(f"{name} is empty (0 examples)")
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(f"{name}: x has {x.shape[0]} examples but y has shape {tuple(y.shape)}")
    return x, y
