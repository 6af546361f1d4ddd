"""The base class every attack derives from, and the input checks they share.

An :class:`Attack` owns everything that is the same for all attacks, so each attack file holds
only its own algorithm (``_attack(x, y)``):

* argument checks (``x`` a finite floating tensor inside ``[lo, hi]``, ``y`` integer labels of
  matching length, the model returning ``(N, C)`` logits), raising ``TypeError``/``ValueError``
  that name the argument;
* the model guard (:func:`robustops._guard.frozen_model`): eval mode inside the call, every
  submodule's ``training`` flag, every parameter's ``requires_grad`` and ``.grad`` restored after;
* device handling: ``x`` and ``y`` are moved to the model's device, the result is returned on
  ``x``'s device;
* ``y=None`` means "the model's predictions" (the usual way to avoid label leaking);
* a ``torch.Generator`` seeded from ``seed`` for attacks that draw random numbers;
* an optional tqdm progress bar (off by default).

Calling convention (torchattacks-style)::

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10, seed=0)
    x_adv = atk(x, y)              # untargeted
    atk = PGD(model, eps=8/255, targeted=True)
    x_adv = atk(x, target_labels)  # targeted: y holds the target classes
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch
from torch import nn

from .._checks import as_logits, check_bounds, check_images, check_labels, check_nonneg
from .._gradients import autograd_on
from .._guard import frozen_model, model_device

__all__ = [
    "Attack",
    "check_images",
    "check_labels",
    "check_bounds",
    "check_logits",
    "check_nonneg",
    "per_sample",
    "batch_view",
    "maybe_progress",
]

EpsArg = Union[float, int, torch.Tensor]


# The checks every public entry point shares live in robustops._checks (re-exported here for the
# attack modules). check_logits is the shared model-output rule, as_logits.
def check_logits(logits, n: int) -> torch.Tensor:
    """The model's output as ``(N, C)`` logits (see :func:`robustops._checks.as_logits`)."""
    return as_logits(logits, n)


def per_sample(value: EpsArg, n: int, name: str = "eps") -> Union[float, torch.Tensor]:
    """A budget given as a number, or as one value per sample (tensor ``[N]``).

    Returns a float for a scalar (0-d tensors and 1-element tensors included, so the arithmetic
    stays the scalar arithmetic of other libraries) or a float64 CPU tensor ``[N]``.
    """
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a number or a floating tensor, got dtype {value.dtype}")
        t = value.detach().to("cpu", torch.float64).reshape(-1)
        if t.numel() == 1:
            value = float(t[0])
        else:
            if t.numel() != n:
                raise ValueError(f"{name} must be a number or hold one value per sample ({n}), got {t.numel()} values")
            if not torch.isfinite(t).all() or (t < 0).any():
                raise ValueError(f"{name} must be finite and >= 0, got {t.tolist()}")
            return t
    return check_nonneg(value, name)


def batch_view(value: Union[float, torch.Tensor], x: torch.Tensor):
    """Broadcast a scalar or per-sample ``[N]`` value against ``x`` (``[N, 1, 1, ...]``)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return value


def maybe_progress(iterable: Iterable, enabled: bool, **kwargs) -> Iterable:
    """A tqdm bar around ``iterable`` when ``enabled`` and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency
        return iterable
    return tqdm(iterable, **kwargs)


# --------------------------------------------------------------------------------------------
# the base class
# --------------------------------------------------------------------------------------------
class Attack:
    """Base of every attack: checks, model guard, device handling, seed, ``__call__(x, y)``.

    Subclasses implement ``_attack(x, y) -> x_adv`` (or a result object whose tensors are on the
    model's device). Inside ``_attack``: the model is in eval mode with frozen parameters,
    ``x``/``y`` are validated and on the model's device, ``y`` holds the true labels (untargeted)
    or the target labels (targeted), and ``self.generator`` is a seeded generator on that device
    (or None when ``seed`` is None: then the global RNG is used).

    Args:
        model: classifier returning logits ``(N, C)``; inputs are in ``[lo, hi]``.
        targeted: when True, ``y`` given to ``__call__`` holds the target classes (required).
        lo, hi: pixel bounds (default [0, 1]).
        seed: int seed for the random parts of the attack; same seed, same result.
        progress: tqdm bar for long runs (when tqdm is installed).
    """

    supports_targeted = True

    def __init__(self, model: nn.Module, *, targeted: bool = False, lo: float = 0.0, hi: float = 1.0,
                 seed: Optional[int] = None, progress: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if targeted and not self.supports_targeted:
            raise ValueError(f"{type(self).__name__} has no targeted mode")
        if seed is not None:
            seed = check_nonneg(seed, "seed", integer=True)
        self.model = model
        self.targeted = bool(targeted)
        self.lo, self.hi = check_bounds(lo, hi)
        self.seed = seed
        self.progress = bool(progress)
        self.generator: Optional[torch.Generator] = None
        self.num_classes: Optional[int] = None

    # ---- helpers available to subclasses -------------------------------------------------
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` through the shared output rule (:func:`robustops._checks.as_logits`)."""
        return as_logits(self.model(x), x.shape[0])

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Arg-max labels of ``x`` without building a graph."""
        with torch.no_grad():
            return torch.cat([self.logits(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])

    def _make_generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g

    # ---- the call --------------------------------------------------------------------------
    def prepare(self, x, y=None):
        """Validate ``(x, y)`` and move them to the model's device; returns ``(x, y, out_device)``."""
        check_images(x, self.lo, self.hi)
        if y is not None:
            y = check_labels(y, x.shape[0])
        elif self.targeted:
            raise ValueError("targeted attack: y must hold the target labels (got None)")
        out_device = x.device
        device = model_device(self.model, default=x.device)
        return x.detach().to(device), (None if y is None else y.to(device)), out_device

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        x, y, out_device = self.prepare(x, y)
        # autograd_on: the attack works the same under torch.inference_mode() / no_grad() (one rule,
        # robustops._gradients); inputs made under inference mode are copied to normal tensors.
        with frozen_model(self.model), autograd_on():
            x = _normal(x)
            y = None if y is None else _normal(y)
            with torch.no_grad():
                logits = self.logits(x[:1])
            self.num_classes = logits.shape[1]
            if y is None:
                y = self.predict(x)
            elif int(y.max()) >= self.num_classes:
                raise ValueError(f"y holds class {int(y.max())} but the model has {self.num_classes} outputs")
            self.generator = self._make_generator(x.device)
            out = self._attack(x, y)
        return _to_device(out, out_device)

    def _attack(self, x: torch.Tensor, y: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        keys = [k for k in vars(self) if k not in ("model", "generator", "num_classes") and not k.startswith("_")]
        return f"{type(self).__name__}(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"


def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a normal-tensor copy when it was made under ``torch.inference_mode``."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def _to_device(out, device: torch.device):
    if isinstance(out, torch.Tensor):
        return out.to(device)
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple result
        return type(out)(*[_to_device(v, device) for v in out])
    return out
