"""Leave the user's model exactly as it was: the guard every attack and analysis runs under."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
from torch import nn


@contextlib.contextmanager
def frozen_model(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run ``model`` for analysis without changing anything the user can observe.

    Inside the block the model is in eval mode (when ``eval_mode``) and its parameters do not
    require grad, so ``torch.autograd.grad`` w.r.t. the input does not touch ``param.grad``.
    On exit, in ``finally``: every submodule's ``training`` flag, every parameter's
    ``requires_grad`` and every parameter's ``.grad`` (the same tensor object, or None) are
    restored. Parameters and buffers are never written by robustops code under this guard.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modes: Dict[nn.Module, bool] = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        if eval_mode:
            model.eval()
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes.items():
            m.training = training
        for p, r, g in zip(params, requires, grads):
            p.requires_grad_(r)
            p.grad = g


def model_device(model: nn.Module, default: Optional[torch.device] = None) -> torch.device:
    """Device of the model's first parameter (or buffer); ``default`` / CPU when it has none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return default if default is not None else torch.device("cpu")
