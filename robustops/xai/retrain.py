"""Adversarial retraining (Klawikowska et al. 2020, Sec. 2.B and 4.1, Table 1).

"Complementing the training set with adverse examples, and then retraining the network ...
transferring the weights of the previously trained network and starting the training with such
initial weights": attack the training set, keep the *successful* adversarial examples (clean input
classified correctly, attacked input not) with their true labels, append them to the training set
and fine-tune a copy of the model from its current weights.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Union

import torch
from torch import nn

from .._checks import as_logits, as_pair, check_int, check_labels, check_model
from .._guard import frozen_model, model_device
from ..attacks.base import Attack
from ..models.training import train

__all__ = ["adversarial_retrain", "RetrainReport", "predict"]


class RetrainReport(NamedTuple):
    """What :func:`adversarial_retrain` did.

    Fields: ``n_train`` (clean training examples), ``n_attacked`` (examples the attack ran on:
    ``n_train`` unless ``attack_limit``), ``n_correct`` (of those, classified correctly by the input
    model, i.e. attackable), ``n_adversarial`` (successful adversarial examples added),
    ``attack_success_rate`` (``n_adversarial / n_correct``), ``history`` (the fine-tuning history of
    :func:`robustops.models.train`), ``attack`` (repr), ``settings`` (epochs, optimizer, lr, batch size,
    seed), ``seconds`` (``{"attack": s, "train": s}``).
    """

    n_train: int
    n_attacked: int
    n_correct: int
    n_adversarial: int
    attack_success_rate: float
    history: Dict[str, List[float]]
    attack: str
    settings: dict
    seconds: Dict[str, float]


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Arg-max labels of ``x`` (on ``x``'s device), model guarded (eval inside, restored)."""
    check_model(model)
    out = []
    with frozen_model(model), torch.no_grad():
        device = model_device(model, default=x.device)
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size].to(device)
            out.append(as_logits(model(xb), xb.shape[0]).argmax(1).to(x.device))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def _run_attack(attack, model, x, y) -> torch.Tensor:
    if isinstance(attack, Attack):
        x_adv = attack(x, y)
        x_adv = getattr(x_adv, "x_adv", x_adv)  # result objects (DeepFoolResult)
    elif callable(attack):
        x_adv = attack(model, x, y)
        x_adv = getattr(x_adv, "x_adv", x_adv)
    else:
        raise TypeError("attack must be a robustops Attack instance (e.g. FGSM(model, eps=0.1)) or a callable "
                        f"attack(model, x, y) -> x_adv, got {type(attack).__name__}")
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise ValueError(f"attack must return x_adv with x's shape {tuple(x.shape)}, got "
                         f"{tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__}")
    return x_adv.detach().to(x.device)


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack, batch_size: int = 256):
    """``(x_adv, success)`` over ``x`` in batches; ``success``: clean correct and attacked wrong."""
    pred = predict(model, x)
    xs, succ = [], []
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s:s + batch_size], y[s:s + batch_size]
        xa = _run_attack(attack, model, xb, yb)
        xs.append(xa)
        succ.append((pred[s:s + batch_size] == yb) & (predict(model, xa) != yb))
    return torch.cat(xs), torch.cat(succ)


def adversarial_retrain(model: nn.Module, train_data, attack: Union[Attack, Callable], epochs: int = 1,
                        seed: Optional[int] = 0, *, optimizer: str = "adam", lr: Optional[float] = None,
                        batch_size: int = 64, attack_batch_size: int = 256, attack_limit: Optional[int] = None,
                        weight_decay: float = 0.0,
                        device=None, progress: bool = False):
    """Adversarial retraining: fine-tune a copy of ``model`` on the training set plus its successful
    adversarial examples.

    Args:
        model: trained classifier (``(N, C)`` logits). Never modified: a deep copy is fine-tuned.
        train_data: ``(x, y)`` tensors or a DataLoader of ``(x, y)`` batches (pixel space [0, 1]).
        attack: any robustops attack instance (``FGSM(model, eps=0.1)``, ``PGD(...)``,
            ``OnePixel(model, steps=10)``; it attacks the model it was built with, normally ``model``),
            or a callable ``attack(model, x, y) -> x_adv`` (e.g. ``lambda m, x, y: fgsm(m, x, y, 0.1)``).
        epochs: fine-tuning epochs (>= 1) over the extended set.
        seed: seeds the fine-tuning (batch order); the attack carries its own seed.
        optimizer, lr, batch_size, weight_decay, device, progress: passed to
            :func:`robustops.models.train` (``lr=None``: its default for the optimizer).
        attack_batch_size: examples attacked per call.
        attack_limit: attack only the first ``attack_limit`` training examples (for expensive attacks
            such as one-pixel); all examples are still used for fine-tuning. None: attack all.

    Returns:
        ``(new_model, report)``: the fine-tuned copy (in the input model's train/eval state) and a
        :class:`RetrainReport`.

    Raises:
        TypeError / ValueError for bad arguments (attack not an attack, labels not integer classes,
        empty data); :class:`robustops._checks.EmptyDataError` for empty ``train_data``.
    """
    check_model(model)
    epochs = check_int(epochs, "epochs")
    attack_batch_size = check_int(attack_batch_size, "attack_batch_size")
    x, y = as_pair(train_data, name="train_data")
    if not isinstance(attack, Attack) and not callable(attack):
        raise TypeError("attack must be a robustops Attack instance (e.g. FGSM(model, eps=0.1)) or a callable "
                        f"attack(model, x, y) -> x_adv, got {type(attack).__name__}")
    y = check_labels(y, x.shape[0], "train_data labels")
    n_att = x.shape[0] if attack_limit is None else min(check_int(attack_limit, "attack_limit"), x.shape[0])
    t0 = time.perf_counter()
    x_adv, success = adversarial_examples(model, x[:n_att], y[:n_att], attack, attack_batch_size)
    t1 = time.perf_counter()
    n_correct = int((predict(model, x[:n_att]) == y[:n_att]).sum())
    x_ext = torch.cat([x, x_adv[success]])
    y_ext = torch.cat([y, y[:n_att][success]])
    new = copy.deepcopy(model)
    history = train(new, (x_ext, y_ext), epochs, optimizer=optimizer, lr=lr, batch_size=batch_size, seed=seed,
                    weight_decay=weight_decay, device=device, progress=progress)
    t2 = time.perf_counter()
    n_adv = int(success.sum())
    report = RetrainReport(
        n_train=int(x.shape[0]), n_attacked=int(n_att), n_correct=n_correct, n_adversarial=n_adv,
        attack_success_rate=n_adv / n_correct if n_correct else 0.0, history=history, attack=repr(attack),
        settings=dict(epochs=epochs, optimizer=optimizer, lr=lr, batch_size=batch_size, seed=seed,
                      weight_decay=weight_decay),
        seconds={"attack": t1 - t0, "train": t2 - t1},
    )
    return new, report
