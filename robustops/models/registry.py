"""Look up a model builder by name: ``get_model("resnet18", stem="mnist")``."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn

from .lenet import lenet
from .papernot import papernot_mnist
from .resnet import resnet18, resnet50, resnet101
from .small import small_cnn
from .vgg import vgg11

__all__ = ["get_model", "list_models", "MODELS"]

#: name -> builder. Builders take keyword arguments only through ``get_model``.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "papernot_mnist": papernot_mnist,
    "vgg11": vgg11,
    "lenet": lenet,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "small_cnn": small_cnn,
}


def list_models() -> List[str]:
    """Names accepted by :func:`get_model`, sorted."""
    return sorted(MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with the builder's keyword arguments.

    Names are matched case-insensitively and "-" counts as "_" (``"Small-CNN"`` works).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: unknown name; the message lists the valid ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(list_models())}")
    return MODELS[key](**kwargs)
