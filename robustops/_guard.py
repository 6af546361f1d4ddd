"""Leave the user's model exactly as it was: the guard every attack and analysis runs under.

Thread safety: the guard keeps one record per model (a reference count and the snapshot taken by
the first entrant). Concurrent or nested guards on the same model share that record: the first
one to enter snapshots the user's state and freezes the model, the last one to leave restores the
snapshot. Two threads attacking one model therefore both run on the frozen model and the user's
state comes back exactly once both are done (a per-model snapshot under a lock, not one per call,
which would capture the other thread's frozen state).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

_LOCK = threading.Lock()
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, _Record]" = weakref.WeakKeyDictionary()


class _Record:
    __slots__ = ("count", "modes", "params", "requires", "grads", "eval_mode")

    def __init__(self, model: nn.Module, eval_mode: bool):
        self.count = 0
        self.eval_mode = eval_mode
        self.modes: Dict[nn.Module, bool] = {m: m.training for m in model.modules()}
        self.params: Optional[List[nn.Parameter]] = None     # taken by the first freezing entrant

    def snapshot_params(self, model: nn.Module) -> None:
        """The parameters' requires_grad flags and .grad tensors, before anything freezes them
        (until then only non-freezing guards, under no_grad, have entered: they are the user's)."""
        self.params = list(model.parameters())
        self.requires = [p.requires_grad for p in self.params]
        self.grads = [p.grad for p in self.params]

    def restore(self) -> None:
        # write back only what differs: the common case (an eval-mode model, no grads) writes
        # nothing but the requires_grad flags the guard cleared
        for m, training in self.modes.items():
            if m.training != training:
                m.training = training
        if self.params is None:                              # no guard froze the parameters
            return
        for p, r, g in zip(self.params, self.requires, self.grads):
            if p.requires_grad != r:
                p.requires_grad_(r)
            if p.grad is not g:
                p.grad = g


@contextlib.contextmanager
def frozen_model(model: nn.Module, eval_mode: bool = True, freeze_params: bool = True) -> Iterator[nn.Module]:
    """Run ``model`` for analysis without changing anything the user can observe.

    Inside the block the model is in eval mode (when ``eval_mode``) and its parameters do not
    require grad (when ``freeze_params``), so ``torch.autograd.grad`` w.r.t. the input does not
    touch ``param.grad``. ``freeze_params=False`` is for blocks that run under ``torch.no_grad``
    (nothing can reach a ``.grad`` there); it neither writes nor snapshots the parameters' flags
    (a freezing guard nested inside takes the snapshot before it freezes them).
    When the last guard on the model exits (in ``finally``): every submodule's ``training``
    flag, every parameter's ``requires_grad`` and every parameter's ``.grad`` (the same tensor
    object, or None) are restored to what they were before the first guard entered. Safe to
    nest and to use from several threads on one model. Parameters and buffers are never written
    by robustops code under this guard.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with _LOCK:
        rec = _ACTIVE.get(model)
        if rec is None:
            rec = _Record(model, eval_mode)
            _ACTIVE[model] = rec
        rec.count += 1
        if eval_mode and any(m.training for m in rec.modes):
            model.eval()                                     # its train(False) overrides run, as users expect
        if freeze_params:
            if rec.params is None:
                rec.snapshot_params(model)
            for p in rec.params:
                if p.requires_grad:
                    p.requires_grad_(False)
    try:
        yield model
    finally:
        with _LOCK:
            rec.count -= 1
            if rec.count == 0:
                del _ACTIVE[model]
                rec.restore()


def model_device(model: nn.Module, default: Optional[torch.device] = None) -> torch.device:
    """Device of the model's first parameter (or buffer); ``default`` / CPU when it has none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return default if default is not None else torch.device("cpu")
