"""Neuron features from forward hooks: the descriptors of Granda et al., Sec. 4.1.

A *neuron* (unit) is one output channel of a convolution or one output unit of a fully-connected
layer. For an image, its response is summarised by the squared L2 norm of its output map (for a
linear unit: its squared output). One descriptor per layer, concatenated over the selected
layers (every conv / linear layer but the last, the logits layer), gives the vector
``x_i in R^m`` of Alg. 1.

Two normalisations (``normalize=``):

* ``"l2"`` (default; Alg. 1, step 2, as printed in the paper): each layer's descriptor divided by
  its L2 norm, then concatenated (the whole vector has norm sqrt(L) for L layers).
* ``"sum_l2"``: each layer's descriptor divided by its sum, then the concatenated vector divided
  by its L2 norm (norm 1). (Public code of the same group's earlier work -- VEBI, Oramas et al.
  2019 -- divides each layer by its sum without the final L2 step.)

The choice decides how sparse the mu-Lasso selection is at a given mu, because the L1 budget is
measured against the feature scale: with ``"l2"`` the features are larger, so mu=10 buys weights
on ~5% of the neurons of Papernot's net (converged solves) -- the low end of the paper's
regime (5.3-18.3% of LeNet's neurons at mu=10) -- while ``"sum_l2"`` selects about 1% (one to
five neurons per class). Measurements in docs/detection.md.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._checks import as_logits, check_images, check_model, iter_batches
from .._guard import frozen_model, model_device

__all__ = ["ActivationRecorder", "NoLayersError", "select_layers", "neuron_features", "normalize_features",
           "NORMALIZATIONS", "extract", "Extracted"]

NORMALIZATIONS = ("l2", "sum_l2")
_EPS = 1e-12


class NoLayersError(ValueError):
    """The model has no convolution / fully-connected layer to take features from."""


def _is_unit_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


def select_layers(model: nn.Module, layers: Optional[Sequence[Union[str, nn.Module]]] = None,
                  include_last: bool = False) -> List[Tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs features are taken from.

    ``layers=None``: every ``nn.Conv*d`` / ``nn.Linear`` (and subclasses, e.g.
    ``robustops.nn.CompactConv2d``) in registration order, except the last one (the logits layer)
    unless ``include_last``. Otherwise a list of submodule names (``"conv1"``, ``"features.3"``)
    or module objects of ``model``.

    Raises:
        NoLayersError: the model has no conv / linear layer (or only the logits layer).
        ValueError: a named layer does not exist, or is listed twice.
        TypeError: a list entry is neither a name nor a submodule.
    """
    check_model(model)
    if layers is None:
        found = [(n, m) for n, m in model.named_modules() if n and _is_unit_layer(m)]
        if not include_last:
            found = found[:-1]
        if not found:
            raise NoLayersError(
                f"{type(model).__name__} has no convolution or linear layer before its last one; the detectors "
                "take features from nn.Conv*d / nn.Linear outputs: pass layers=[names] of other submodules")
        return found
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_id = None
    out: List[Tuple[str, nn.Module]] = []
    for entry in layers:
        if isinstance(entry, str):
            try:                                             # a path lookup: no walk over every module
                mod = model.get_submodule(entry) if entry else None
            except AttributeError:
                mod = None
            if not isinstance(mod, nn.Module):
                raise ValueError(f"layers: model has no submodule named {entry!r}")
            out.append((entry, mod))
        elif isinstance(entry, nn.Module):
            if by_id is None:
                by_id = {id(m): n for n, m in model.named_modules()}
            if id(entry) not in by_id or by_id[id(entry)] == "":
                raise ValueError(f"layers: {type(entry).__name__} object is not a submodule of the model")
            out.append((by_id[id(entry)], entry))
        else:
            raise TypeError(f"layers entries must be submodule names or modules, got {type(entry).__name__}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"layers lists a layer twice: {names}")
    if not out:
        raise NoLayersError("layers is empty")
    return out


def sq_l2_per_channel(out: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each channel of a layer output ``[N, C, *spatial]`` -> ``[N, C]``;
    a ``[N, F]`` output gives its squared values."""
    if out.dim() == 2:
        return out * out
    return torch.linalg.vector_norm(out.flatten(2), ord=2, dim=2).square_()


class ActivationRecorder(contextlib.AbstractContextManager):
    """Record a reduction of chosen layers' outputs during forward passes (forward hooks).

    Usage::

        with ActivationRecorder(model, layers=None) as rec:
            logits = model(x)
        rec.features       # {layer name: Tensor[N, units]} of the last forward
        rec.concat()       # Tensor[N, m] in layer order

    Args:
        model: the network; its parameters and training flags are not touched here (wrap the
            forward in :func:`robustops._guard.frozen_model` for eval mode).
        layers: see :func:`select_layers`.
        reduce: ``"sq_l2"`` (per-channel squared L2 norm, the default), ``"none"`` (the detached
            output flattened to ``[N, -1]``) or a callable ``reduce(output) -> Tensor[N, k]``.

    The hooks are registered on ``__enter__`` and removed on ``__exit__`` even when the body
    raises. A reduction that shares the output's memory (``"none"``) is copied, so a later
    in-place op on the output (``ReLU(inplace=True)``) does not change what was recorded. Outputs that are not tensors raise ``TypeError`` naming the layer.
    """

    def __init__(self, model: nn.Module, layers=None, reduce: Union[str, Callable] = "sq_l2",
                 include_last: bool = False):
        self.model = check_model(model)
        self.layers = select_layers(model, layers, include_last=include_last)
        if reduce == "sq_l2":
            self._reduce = sq_l2_per_channel
        elif reduce == "none":
            self._reduce = lambda o: o.flatten(1)
        elif callable(reduce):
            self._reduce = reduce
        else:
            raise ValueError(f"reduce must be 'sq_l2', 'none' or a callable, got {reduce!r}")
        self.features: Dict[str, torch.Tensor] = {}
        self._handles: list = []

    @property
    def names(self) -> List[str]:
        return [n for n, _ in self.layers]

    def _hook(self, name):
        reduce, features = self._reduce, self.features
        may_alias = reduce is not sq_l2_per_channel               # the norms are always new tensors

        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
            out = output.detach()
            r = reduce(out)
            # a reduction that is a view of the output (flatten) would be overwritten by a later
            # in-place op on it -- ReLU(inplace=True) after a conv, as in torchvision's nets
            if may_alias and isinstance(r, torch.Tensor) and \
                    r.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
                r = r.clone()
            features[name] = r
        return hook

    def __enter__(self):
        try:
            for name, mod in self.layers:
                self._handles.append(mod.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc):
        self._remove()
        return False

    def concat(self) -> torch.Tensor:
        """Features of the last forward, concatenated in layer order: ``[N, m]``."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the last forward pass")
        return torch.cat([self.features[n].flatten(1) for n in self.names], dim=1)

    def sizes(self) -> List[int]:
        return [self.features[n].flatten(1).shape[1] for n in self.names]


def normalize_features(parts: Sequence[torch.Tensor], normalize: str) -> torch.Tensor:
    """Normalise per-layer descriptors ``[N, m_l]`` and concatenate them to ``[N, m]``.

    ``"l2"``: each layer's descriptor / its L2 norm; ``"sum_l2"``: each / its sum, then the
    concatenation / its L2 norm (see the module docstring). Zero descriptors stay zero.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    parts = list(parts)
    # one clamp and one division for all layers (the _foreach ops; the same values as per layer)
    if normalize == "l2":
        scale = [torch.linalg.vector_norm(p, dim=1, keepdim=True) for p in parts]
    else:
        scale = [p.sum(1, keepdim=True).abs() for p in parts]
    torch._foreach_clamp_min_(scale, _EPS)
    cat = torch.cat(torch._foreach_div(parts, scale), 1)
    if normalize == "l2":
        return cat
    return cat / torch.linalg.vector_norm(cat, dim=1, keepdim=True).clamp_min(_EPS)


def neuron_features(model: nn.Module, x: torch.Tensor, layers=None, normalize: str = "l2",
                    return_logits: bool = False):
    """Normalised neuron descriptors of one batch ``x [N, ...]`` (pixel space [0, 1]): ``[N, m]``
    (and the logits ``[N, C]`` when ``return_logits``), from one forward pass of the model under
    ``frozen_model`` and ``torch.no_grad``. Granda et al., Alg. 1 steps 1-3."""
    check_images(x, name="x")
    with frozen_model(model), torch.no_grad(), ActivationRecorder(model, layers) as rec:
        logits = as_logits(model(x.to(model_device(model, x.device))), x.shape[0])
        feats = normalize_features([rec.features[n] for n in rec.names], normalize)
    return (feats, logits) if return_logits else feats


class Extracted(NamedTuple):
    features: torch.Tensor          # [N, m] float32, CPU
    predictions: torch.Tensor       # [N] int64, CPU
    sizes: List[int]                # units per layer
    sample_shape: Tuple[int, ...]   # image shape (without N)
    num_classes: int                # model outputs


def extract(model: nn.Module, data, layers=None, normalize: str = "l2", batch_size: int = 256,
            name: str = "x", sample_shape: Optional[Tuple[int, ...]] = None):
    """Stream ``data`` (a tensor ``[N, ...]`` or an iterable of batches / ``(x, y)`` batches)
    through the model once: ``(features [N, m] float32 CPU, predictions [N] int64 CPU, layer
    sizes, image shape)``.

    Only the features and predictions are kept (O(N*m) memory), never the images. Batches whose
    image shape differs from the first batch's (or from ``sample_shape``) raise
    :class:`~robustops.detect.ShapeMismatchError`.
    """
    from .base import ShapeMismatchError
    feats, preds = [], []
    sizes: List[int] = []
    with frozen_model(model), torch.no_grad(), ActivationRecorder(model, layers) as rec:
        dev = model_device(model)
        for xb in _iter_images(data, batch_size, name):
            check_images(xb, name=name)
            if sample_shape is None:
                sample_shape = tuple(xb.shape[1:])
            elif tuple(xb.shape[1:]) != tuple(sample_shape):
                raise ShapeMismatchError(f"{name} holds images of shape {tuple(xb.shape[1:])}, expected "
                                         f"{tuple(sample_shape)} (the clean set's / the fitted detector's)")
            logits = as_logits(model(xb.to(dev)), xb.shape[0])
            parts = [rec.features[n] for n in rec.names]
            sizes = [p.shape[1] for p in parts]
            feats.append(normalize_features(parts, normalize).float().cpu())
            preds.append(logits.argmax(1).cpu())
            n_cls = logits.shape[1]
    if not feats:
        from .._checks import EmptyDataError
        raise EmptyDataError(f"{name} holds no examples")
    return Extracted(torch.cat(feats), torch.cat(preds), sizes, tuple(sample_shape), n_cls)


def _iter_images(data, batch_size: int, name: str) -> Iterator[torch.Tensor]:
    """Image batches of a tensor ``[N, ...]``, an ``(x, y)`` pair, or an iterable of batches
    (each a tensor or an ``(x, y, ...)`` tuple)."""
    if isinstance(data, torch.Tensor):
        if data.dim() < 2:
            raise ValueError(f"{name} must be a batch [N, ...], got shape {tuple(data.shape)}")
        if data.shape[0] == 0:
            from .._checks import EmptyDataError
            raise EmptyDataError(f"{name} is empty (batch size 0)")
        for s in range(0, data.shape[0], batch_size):
            yield data[s:s + batch_size]
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[1].dim() == 1 and data[0].dim() >= 2 and data[0].shape[0] == data[1].shape[0]:
        for xb, _ in iter_batches(data, batch_size, name):
            yield xb
        return
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a tensor [N, ...] or a DataLoader of batches, got {type(data).__name__}")
    for i, batch in enumerate(data):
        if isinstance(batch, torch.Tensor):
            yield batch
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            yield batch[0]
        else:
            raise TypeError(f"{name}: batch {i} must be a tensor or an (x, ...) tuple, got {type(batch).__name__}")
