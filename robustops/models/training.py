"""A small, seeded training loop and an evaluation helper for the model zoo.

Not a framework: enough to train the paper models reproducibly (SGD with momentum / Adam,
weight decay, label smoothing, step learning-rate schedule) and to measure clean accuracy.
Attacks, adversarial retraining and detectors build on these two functions.

Both functions leave the caller's model in the train/eval state it had: every submodule's
``training`` flag is recorded and restored. During training, a submodule the user put in eval
mode inside a model in training mode (``model.train(); model.bn1.eval()``, a frozen batch norm)
stays in eval mode: its running statistics are not updated.

Inputs follow the package's shared rules (:mod:`robustops._checks`): the model's output becomes
logits through :func:`~robustops._checks.as_logits` (a tuple output is refused with a
``ValueError`` suggesting ``robustops.SelectOutput``), class labels may have any integer dtype and
are checked against the model's number of classes *before* any parameter or buffer changes.
"""
from __future__ import annotations

import math
import numbers
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .._checks import as_logits, check_labels

__all__ = ["train", "evaluate"]

TensorPair = Tuple[torch.Tensor, torch.Tensor]
LoaderLike = Union[Iterable, TensorPair]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_OPTIMIZERS = ("sgd", "adam")
_DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@contextmanager
def _preserve_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (even on error).

    ``model.train(was_training)`` alone would flatten a mixed state (some submodules in eval).
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def _is_tensor_pair(obj) -> bool:
    # A list of two *batches* holds tuples, not tensors, so this test does not confuse the two.
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)


def _check_targets(y: torch.Tensor, n: int, name: str) -> None:
    if y.shape[0] != n:
        raise ValueError(f"{name}: x has {n} rows but y has {y.shape[0]}")
    if y.dim() == 1:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"{name}: 1-D labels must be an integer tensor, got {y.dtype}")
    elif y.dim() == 2:
        if not y.is_floating_point():
            raise TypeError(f"{name}: 2-D targets are class probabilities and must be floating, got {y.dtype}")
    else:
        raise ValueError(f"{name}: y must be 1-D class indices or 2-D class probabilities, got shape {tuple(y.shape)}")


def _checked_targets(y: torch.Tensor, n: int, name: str, num_classes: Optional[int]) -> torch.Tensor:
    """Labels after the shared rule: 1-D class indices of any integer dtype -> int64, in
    ``[0, num_classes)`` (when known); 2-D class probabilities must be floating with C columns."""
    _check_targets(y, n, name)
    if y.dim() == 1:
        return check_labels(y, n, name=f"{name}: y", num_classes=num_classes)
    if num_classes is not None and y.shape[1] != num_classes:
        raise ValueError(f"{name}: 2-D targets have {y.shape[1]} columns but the model has {num_classes} outputs")
    return y


@torch.no_grad()
def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The model's number of outputs, from one example in eval mode (no buffer is updated)."""
    with _preserve_modes(model):
        model.eval()
        return as_logits(model(x[:1]), 1, check_finite=False).shape[1]


def _normal(t: torch.Tensor) -> torch.Tensor:
    """A normal copy of an inference tensor (autograd cannot save inference tensors)."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def _enter_train_mode(model: nn.Module) -> None:
    """Training mode for the model, except submodules the user put in eval mode inside a model in
    training mode (frozen batch norms). A model passed entirely in eval mode is trained whole."""
    if model.training:
        return  # every flag is the user's choice: submodules in eval mode stay in eval mode
    model.train()


def _check_pair(pair: Sequence[torch.Tensor], name: str) -> TensorPair:
    x, y = pair
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have a batch dimension, got a 0-d tensor")
    _check_targets(y, x.shape[0], name)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 examples)")
    return x, y


def _check_loader(loader, name: str) -> None:
    if _is_tensor_pair(loader):
        return
    if isinstance(loader, torch.Tensor) or not isinstance(loader, Iterable):
        raise TypeError(
            f"{name} must be a DataLoader, an iterable of (x, y) batches or an (x, y) tensor pair, "
            f"got {type(loader).__name__}"
        )
    try:
        n = len(loader)  # DataLoader over an IterableDataset may not know its length
    except TypeError:
        return
    if n == 0:
        raise ValueError(f"{name} is empty (0 batches)")


def _split_batch(batch, name: str) -> TensorPair:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{name} must yield (x, y, ...) tuples or lists, got {type(batch).__name__}")
    if not isinstance(batch[0], torch.Tensor) or not isinstance(batch[1], torch.Tensor):
        raise TypeError(f"{name} must yield tensors (x, y, ...), got ({type(batch[0]).__name__}, "
                        f"{type(batch[1]).__name__}); an (x, y) pair must hold tensors, not lists")
    return batch[0], batch[1]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(value, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


def _accuracy_counts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Number of correct top-1 predictions in the batch (as a tensor: no host sync)."""
    target = y.argmax(1) if y.dim() == 2 else y
    return (logits.argmax(1) == target).sum()


def _maybe_tqdm(iterable, enabled: bool, **kwargs):
    """Wrap in a tqdm bar when asked for and tqdm is installed (it is an optional dependency)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    loader: LoaderLike,
    epochs: int = 1,
    *,
    optimizer: Union[str, torch.optim.Optimizer] = "sgd",
    lr: Optional[float] = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
    loss_fn: Optional[LossFn] = None,
    lr_milestones: Optional[Sequence[int]] = None,
    lr_gamma: float = 0.1,
    seed: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = False,
    batch_size: int = 64,
) -> Dict[str, List[float]]:
    """Train ``model`` in place for ``epochs`` passes over ``loader``.

    Args:
        model: the network; its parameters are updated in place. Its train/eval state (every
            submodule's) is restored on return.
        loader: a ``DataLoader`` (or any re-iterable of ``(x, y, ...)`` batches), or an
            ``(x, y)`` tensor pair, which is batched here with ``batch_size`` and shuffled each
            epoch by a generator seeded from ``seed``. ``y`` holds class indices (1-D integer)
            or class probabilities (2-D float, e.g. distillation soft labels).
        epochs: number of passes, >= 1.
        optimizer: "sgd" (with ``momentum``) or "adam", or an already-built
            ``torch.optim.Optimizer`` over the model's parameters (then ``lr``, ``momentum``
            and ``weight_decay`` are not used, and passing ``lr`` is an error).
        lr: learning rate; None means 0.01 for SGD and 1e-3 for Adam.
        momentum: SGD momentum in [0, 1).
        weight_decay: L2 penalty, >= 0 (the papers use 5e-4).
        label_smoothing: in [0, 1), passed to the cross-entropy loss (0.1 gives Ranjan et al.'s
            "LS" soft labels {1/90, 0.9} for 10 classes).
        loss_fn: ``loss_fn(logits, y) -> scalar``; replaces cross-entropy. Cannot be combined
            with ``label_smoothing``.
        lr_milestones: epochs (1-based, increasing) after which the learning rate is multiplied
            by ``lr_gamma`` (a step schedule, e.g. ``[30, 40]``).
        seed: when given, ``torch.manual_seed(seed)`` is called and the loader's own generator
            (if any) is reseeded, so the batch order, dropout masks and hence the trained weights
            are reproducible for a given initial model.
        device: where to train; the model is moved there (``model.to(device)``). None means
            the device of the model's parameters.
        progress: show a tqdm bar per epoch, if tqdm is installed.
        batch_size: batch size for the tensor-pair form of ``loader``.

    Returns:
        history dict with per-epoch lists: ``"loss"`` (mean training loss), ``"accuracy"``
        (training accuracy seen during the epoch), ``"lr"`` (rate used in the epoch) and
        ``"time"`` (seconds).

    Raises:
        TypeError / ValueError naming the bad argument (labels: float/bool -> ``TypeError``,
        out of range -> ``ValueError``, checked before any parameter or buffer changes for the
        tensor-pair form and before each batch's forward pass for a loader; a model output that is
        not one logits tensor -> ``ValueError``); ``FloatingPointError`` if the loss becomes NaN
        or infinite (lower ``lr``).

    Works when called under ``torch.no_grad()`` or ``torch.inference_mode()`` (autograd is turned
    on for the training steps; the model must not have been *built* under inference mode).

    Modes: a model in training mode is trained with every submodule's flag as the user set it
    (submodules in eval mode, e.g. frozen batch norms, stay in eval mode and keep their running
    statistics); a model in eval mode is put in training mode whole. Flags are restored on return.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    epochs = _check_int(epochs, "epochs", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    momentum = _check_float(momentum, "momentum", 0.0, 1.0)
    weight_decay = _check_float(weight_decay, "weight_decay", 0.0, math.inf)
    label_smoothing = _check_float(label_smoothing, "label_smoothing", 0.0, 1.0)
    lr_gamma = _check_float(lr_gamma, "lr_gamma", 0.0, math.inf, lo_open=True)
    if seed is not None:
        seed = _check_int(seed, "seed", 0)
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
        if label_smoothing != 0.0:
            raise ValueError("label_smoothing applies to the built-in cross-entropy; fold it into loss_fn instead")
    milestones: List[int] = []
    if lr_milestones is not None:
        if isinstance(lr_milestones, (str, bytes)) or not isinstance(lr_milestones, Iterable):
            raise TypeError(f"lr_milestones must be a sequence of ints, got {lr_milestones!r}")
        milestones = [_check_int(m, "lr_milestones[i]", 1) for m in lr_milestones]
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"lr_milestones must be strictly increasing, got {milestones}")
    _check_loader(loader, "loader")

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")

    if isinstance(optimizer, torch.optim.Optimizer):
        if lr is not None:
            raise ValueError("lr is set by the optimizer instance; do not pass lr with one")
        opt = optimizer
    elif isinstance(optimizer, str):
        name = optimizer.lower()
        if name not in _OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {_OPTIMIZERS} or pass a torch.optim.Optimizer")
        lr = _DEFAULT_LR[name] if lr is None else _check_float(lr, "lr", 0.0, math.inf, lo_open=True)
        if name == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise TypeError(f"optimizer must be 'sgd', 'adam' or a torch.optim.Optimizer, got {type(optimizer).__name__}")

    if device is not None:
        model.to(device)
    dev = torch.device(device) if device is not None else _model_device(model)

    if seed is not None:
        torch.manual_seed(seed)
        # A DataLoader built with generator=... shuffles from that generator, not the global one.
        for gen in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
            if isinstance(gen, torch.Generator):
                gen.manual_seed(seed)

    check_ce = loss_fn is None  # the class range is only known for the built-in cross-entropy
    num_classes: Optional[int] = None
    if _is_tensor_pair(loader):
        x_all, y_all = _check_pair(loader, "loader")
        # every label is checked before the first step (no parameter or buffer changes on bad labels)
        if check_ce:
            num_classes = _num_classes(model, x_all[:1].to(dev))
        y_all = _checked_targets(y_all, x_all.shape[0], "loader", num_classes)
        # Own generator: the shuffle order depends on seed (or, without one, on the global RNG
        # state at call time) and not on how many random numbers the model draws meanwhile.
        shuffle_gen = torch.Generator()
        shuffle_gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        batches: Iterable = DataLoader(TensorDataset(x_all, y_all), batch_size=batch_size, shuffle=True,
                                       generator=shuffle_gen)
    else:
        batches = loader

    criterion: LossFn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=lr_gamma) if milestones else None

    history: Dict[str, List[float]] = {"loss": [], "accuracy": [], "lr": [], "time": []}
    # Training needs autograd whatever the caller's mode (no_grad / inference_mode around the call)
    with _preserve_modes(model), torch.inference_mode(False), torch.enable_grad():
        _enter_train_mode(model)
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            # Sums stay on the device; one host sync per epoch instead of one per batch.
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            seen = 0
            bar = _maybe_tqdm(batches, progress, desc=f"epoch {epoch}/{epochs}", leave=False)
            for batch in bar:
                x, y = _split_batch(batch, "loader")
                n = x.shape[0]
                if n == 0:
                    continue
                if check_ce and num_classes is None:
                    num_classes = _num_classes(model, x[:1].to(dev))
                # labels checked before the forward pass that would update batch-norm buffers
                y = _checked_targets(y, n, "loader", num_classes)
                x, y = _normal(x.to(dev)), _normal(y.to(dev))
                opt.zero_grad(set_to_none=True)
                logits = as_logits(model(x), n, check_finite=False)
                loss = criterion(logits, y)
                loss.backward()
                opt.step()
                loss_sum += loss.detach().double() * n
                if logits.dim() == 2:
                    correct += _accuracy_counts(logits.detach(), y)
                seen += n
                if progress and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            if seen == 0:
                raise ValueError(
                    f"loader yielded no examples in epoch {epoch}"
                    + (" (a one-shot iterator? pass a DataLoader or a list of batches)" if epoch > 1 else "")
                )
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} in epoch {epoch}; lower lr")
            history["loss"].append(mean_loss)
            history["accuracy"].append(correct.item() / seen)
            history["lr"].append(opt.param_groups[0]["lr"])
            history["time"].append(time.perf_counter() - t0)
            if scheduler is not None:
                scheduler.step()
    return history


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
def evaluate(
    model: nn.Module,
    loader_or_xy: LoaderLike,
    batch_size: int = 256,
    *,
    loss_fn: Optional[LossFn] = None,
    device: Union[str, torch.device, None] = None,
) -> Tuple[float, float]:
    """Top-1 accuracy and mean loss of ``model`` on a dataset, in eval mode without gradients.

    Args:
        model: the network (not moved: pass ``device`` only to say where its parameters are
            when it has none, otherwise inputs go to the parameters' device).
        loader_or_xy: a ``DataLoader`` / iterable of ``(x, y, ...)`` batches, or an ``(x, y)``
            tensor pair (split into ``batch_size`` chunks; no copy of ``x`` is made).
        batch_size: chunk size for the tensor-pair form.
        loss_fn: ``loss_fn(logits, y)`` returning the batch *mean*; default cross-entropy.
        device: device for the inputs; None means the model's.

    Returns:
        ``(accuracy, mean_loss)`` as Python floats, both averaged over examples.

    The model's train/eval state is restored in ``finally``, also when the forward pass raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    _check_loader(loader_or_xy, "loader_or_xy")
    dev = torch.device(device) if device is not None else _model_device(model)

    if _is_tensor_pair(loader_or_xy):
        x_all, y_all = _check_pair(loader_or_xy, "loader_or_xy")
        batches: Iterable = zip(x_all.split(batch_size), y_all.split(batch_size))
    else:
        batches = loader_or_xy

    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
    with _preserve_modes(model), torch.no_grad():
        model.eval()
        for batch in batches:
            x, y = _split_batch(batch, "loader_or_xy")
            n = x.shape[0]
            if n == 0:
                continue
            x = x.to(dev)
            logits = as_logits(model(x), n, check_finite=False)
            y = _checked_targets(y, n, "loader_or_xy", logits.shape[1] if loss_fn is None else None).to(dev)
            nonfinite |= ~torch.isfinite(logits).all()
            if loss_fn is None:
                loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            else:
                loss_sum += loss_fn(logits, y).double() * n
            correct += _accuracy_counts(logits, y)
            seen += n
    if seen == 0:
        raise ValueError("loader_or_xy yielded no examples")
    if bool(nonfinite):
        raise ValueError("model returned NaN or Inf logits (check the model and its input)")
    return correct.item() / seen, loss_sum.item() / seen
