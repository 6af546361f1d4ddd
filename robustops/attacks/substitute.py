"""Papernot et al.'s practical black-box attack (AsiaCCS 2017): train a substitute model on
labels queried from the target ("oracle"), grow its training set by Jacobian-based dataset
augmentation, then attack the substitute with FGSM and transfer the examples to the oracle.
Ranjan et al. 2017 (papers/compact-convolution-ranjan2017.txt, Table 6) evaluate their models
this way with a LeNet substitute.

Substitute training, rounds ``r = 0 .. rounds-1``::

    D_r      = {(s, argmax oracle(s)) : s in S_r}         (the oracle is queried for labels only)
    F        <- train F on D_r
    S_{r+1}  = S_r  U  {clip(s + lambda_r * sign(dF_{oracle(s)}(s)/ds)) : s in S_r}
    lambda_r = lambda * (-1)^floor(r / tau)              (sign alternation; tau=None: never)

Then ``x_adv = clip(x + eps * sign(grad_x CE(F(x), y)))`` for every eps (fused ``fgsm_step``)
and the oracle's accuracy on ``x_adv`` is the black-box robust accuracy.

Oracle queries: only the points added in a round are sent to the oracle (the labels of ``S_r``
are kept), so training costs ``|S_{rounds-1}| = |S_0| * 2^(rounds-1)`` label queries, Papernot et
al.'s count (150 seeds and 3 rounds: 600). ``SubstituteResult.queries`` is that number; the
evaluation afterwards (labels of ``x_attack`` and of each ``x_adv[k]``) is not counted.

Reproducibility: the whole call runs under ``torch.random.fork_rng``; the default substitute is
initialised after ``torch.manual_seed(seed)`` and each round's training is seeded with
``seed + r``. Same ``seed``, same result, and the caller's global RNG state is left as it was.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .._gradients import autograd_on
from .._guard import frozen_model, model_device
from .._ops import as_eps_tensor, fgsm_step
from .base import check_bounds, check_images, check_labels, check_logits, check_nonneg, maybe_progress
from .gradients import input_gradient

__all__ = ["SubstituteResult", "substitute_attack", "oracle_labels"]


class SubstituteResult(NamedTuple):
    """substitute: the trained model; x_adv ``[K, N, ...]`` (one batch per eps); eps ``[K]``;
    clean_accuracy: oracle accuracy on ``x_attack``; adv_accuracy ``[K]``: oracle accuracy on
    ``x_adv[k]``; agreement: fraction of ``x_attack`` on which substitute and oracle agree;
    queries: number of oracle label queries spent on training."""

    substitute: nn.Module
    x_adv: torch.Tensor
    eps: torch.Tensor
    clean_accuracy: float
    adv_accuracy: torch.Tensor
    agreement: float
    queries: int


def oracle_labels(oracle: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The only access the attack has to the target: its arg-max labels (eval mode, no grad)."""
    device = model_device(oracle, x.device)
    out = []
    with frozen_model(oracle), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(device)
            out.append(check_logits(oracle(xb), xb.shape[0]).argmax(1).to(x.device))
    return torch.cat(out)


def substitute_attack(
    oracle: nn.Module,
    x_seed: torch.Tensor,
    x_attack: torch.Tensor,
    y_attack: Optional[torch.Tensor] = None,
    eps: Union[None, float, Sequence[float], torch.Tensor] = None,
    *,
    substitute: Optional[nn.Module] = None,
    rounds: int = 6,
    lam: Optional[float] = None,
    tau: Optional[int] = None,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    lo: float = 0.0,
    hi: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> SubstituteResult:
    """Black-box substitute attack; returns a :class:`SubstituteResult`.

    Args:
        oracle: the attacked model; only its arg-max labels are used. Left unchanged.
        x_seed: the attacker's initial substitute training set ``S_0`` (Papernot et al.: 150
            test images), in ``[lo, hi]``.
        x_attack, y_attack: images to attack and their true labels (None: the oracle's labels).
        eps: FGSM budget(s) on the substitute (number, list or 1-D tensor); default
            ``0.3 * (hi - lo)`` (Papernot et al.'s MNIST budget, scaled to the pixel range).
        substitute: the model trained in place (default: ``robustops.models.lenet`` sized from
            ``x_seed``; needs 12x12 inputs or larger).
        rounds: substitute training rounds (``rounds - 1`` augmentations, |S| doubles each).
        lam: Jacobian augmentation step lambda, default ``0.1 * (hi - lo)`` (Papernot et al.);
            tau: sign-alternation period (None: off).
        epochs, lr, batch_size: substitute training per round (Adam), seeded with ``seed``.
        seed: seeds the default substitute's initialisation and every round's training; the
            call runs under ``torch.random.fork_rng`` so the caller's RNG is untouched.

    Works under ``torch.inference_mode()`` (same result as a plain call). Raises ``TypeError`` /
    ``ValueError`` naming the argument for bad input, and ``ValueError`` when the oracle or the
    substitute returns anything but finite ``(N, C)`` logits.
    """
    if not isinstance(oracle, nn.Module):
        raise TypeError(f"oracle must be a torch.nn.Module, got {type(oracle).__name__}")
    lo, hi = check_bounds(lo, hi)
    check_images(x_seed, lo, hi, "x_seed")
    check_images(x_attack, lo, hi, "x_attack")
    if x_seed.shape[1:] != x_attack.shape[1:]:
        raise ValueError(f"x_seed and x_attack must have the same sample shape, got {tuple(x_seed.shape[1:])} "
                         f"and {tuple(x_attack.shape[1:])}")
    eps_t = as_eps_tensor(0.3 * (hi - lo) if eps is None else eps)
    lam = 0.1 * (hi - lo) if lam is None else lam
    rounds = check_nonneg(rounds, "rounds", integer=True, positive=True)
    lam = check_nonneg(lam, "lam")
    epochs = check_nonneg(epochs, "epochs", integer=True, positive=True)
    if tau is not None:
        tau = check_nonneg(tau, "tau", integer=True, positive=True)
    seed = check_nonneg(seed, "seed", integer=True)
    from .. import models

    devices = sorted({t.device.index or 0 for t in (x_seed, x_attack) if t.device.type == "cuda"}
                     | ({model_device(substitute).index or 0} if isinstance(substitute, nn.Module)
                        and model_device(substitute).type == "cuda" else set()))
    with torch.random.fork_rng(devices=devices), autograd_on():
        x_seed, x_attack = _normal(x_seed), _normal(x_attack)
        num_classes = check_logits(_peek(oracle, x_seed[:1]), 1).shape[1]
        if y_attack is None:
            y_true = oracle_labels(oracle, x_attack)
        else:
            y_true = check_labels(_normal(y_attack), x_attack.shape[0], "y_attack", num_classes=num_classes)
        if substitute is None:
            if x_seed.dim() != 4:
                raise ValueError("the default LeNet substitute needs images [N, C, H, W]; pass substitute=")
            torch.manual_seed(seed)
            substitute = models.lenet(in_channels=x_seed.shape[1], num_classes=num_classes,
                                      input_size=tuple(x_seed.shape[2:]))
        elif not isinstance(substitute, nn.Module):
            raise TypeError(f"substitute must be a torch.nn.Module, got {type(substitute).__name__}")
        sub_device = model_device(substitute, x_seed.device)

        def label_of_logit(logits, labels):  # the Jacobian row of the oracle's label
            return logits.gather(1, labels[:, None]).sum()

        S = x_seed.detach().to(sub_device)
        labels = oracle_labels(oracle, S)  # S_0
        for r in maybe_progress(range(rounds), progress, desc="substitute"):
            models.train(substitute, (S, labels), epochs=epochs, optimizer="adam", lr=lr,
                         batch_size=batch_size, seed=seed + r)
            if r < rounds - 1:
                step = lam * (-1.0) ** (r // tau) if tau else lam
                with frozen_model(substitute):
                    grads = torch.cat([input_gradient(substitute, S[i:i + 1024], labels[i:i + 1024],
                                                      loss_fn=label_of_logit)[0]
                                       for i in range(0, S.shape[0], 1024)])
                new = torch.clamp(S + step * grads.sign(), lo, hi)
                S = torch.cat([S, new])
                labels = torch.cat([labels, oracle_labels(oracle, new)])  # only the new points are queried
        queries = S.shape[0]

        xa = x_attack.detach().to(sub_device)
        ya = y_true.to(sub_device)
        with frozen_model(substitute):
            grad, sub_logits = input_gradient(substitute, xa, ya)
            x_adv = fgsm_step(xa, grad, eps_t, lo, hi)
        oracle_clean = oracle_labels(oracle, xa)
        agreement = float((sub_logits.argmax(1) == oracle_clean).double().mean())
        clean_acc = float((oracle_clean == ya).double().mean())
        adv_acc = torch.stack([(oracle_labels(oracle, x_adv[k]) == ya).double().mean()
                               for k in range(eps_t.numel())]).cpu()
    return SubstituteResult(substitute, x_adv.to(x_attack.device), eps_t, clean_acc, adv_acc, agreement, queries)


def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy when it was made under ``torch.inference_mode``."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


def _peek(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with frozen_model(model), torch.no_grad():
        return model(x.to(model_device(model, x.device)))
