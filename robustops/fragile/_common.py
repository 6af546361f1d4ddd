"""Shared helpers of robustops.fragile: layer lookup, data batching, layer-output capture."""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import EmptyDatasetError, LayerNotFoundError, NotAConvLayerError

LayerLike = Union[str, nn.Module]


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


def iter_batches(data, batch_size: int, name: str = "data") -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a DataLoader / iterable of ``(x, y, ...)`` or an ``(x, y)`` pair."""
    if _is_pair(data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: x has {x.shape[0]} examples but y has {y.shape[0]}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"{name} must yield (x, y, ...) batches, got {type(batch).__name__}")
        yield batch[0], batch[1]


def _is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)
            and isinstance(data[1], torch.Tensor))


def as_pair(data, batch_size: int = 1024, name: str = "data") -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate all of ``data`` into one ``(x, y)`` pair (raises EmptyDatasetError when empty)."""
    if _is_pair(data):
        x, y = data
    else:
        xs, ys = [], []
        for x, y in iter_batches(data, batch_size, name):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise EmptyDatasetError(f"{name} yielded no examples")
        x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] == 0:
        raise EmptyDatasetError(f"{name} is empty (0 examples)")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[0]} examples but y has {y.shape[0]}")
    return x, y


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of ``layer`` for input ``x``; the forward pass is cut right after the layer."""
    box = []

    def hook(_m, _inp, out):
        box.append(out)
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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size
