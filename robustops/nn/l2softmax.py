"""L2-softmax head (Ranjan et al. 2017, "L2-constrained softmax loss"): the feature vector is
L2-normalised and scaled by alpha before the final linear layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._ops import compact_linear
from .compact import _check_alpha_init, _check_delta

__all__ = ["L2SoftmaxLinear", "l2softmax_alpha_lower_bound"]


def l2softmax_alpha_lower_bound(num_classes: int, p: float = 0.9) -> float:
    """Smallest alpha for which a correctly classified, normalised feature can reach softmax
    probability ``p`` with ``num_classes`` classes: ``log(p * (C - 2) / (1 - p))``
    (L2-softmax paper, eq. for alpha_low). Requires ``num_classes > 2`` and ``0 < p < 1``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 2:
        raise ValueError(f"num_classes must be an int > 2, got {num_classes!r}")
    p = float(p)
    if not (0.0 < p < 1.0):
        raise ValueError(f"p must be in (0, 1), got {p}")
    return math.log(p * (num_classes - 2) / (1.0 - p))


class L2SoftmaxLinear(nn.Linear):
    """Final classification layer of an L2-softmax network:
    ``logits = W (alpha * x / (||x||_2 + delta)) + b``.

    ``alpha`` is fixed by default (``learn_alpha=True`` makes it a parameter). ``delta`` only guards
    all-zero features (default 1e-6). Use :func:`l2softmax_alpha_lower_bound` to pick alpha.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        alpha: float = 16.0,
        learn_alpha: bool = False,
        delta: float = 1e-6,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        alpha = _check_alpha_init(alpha)
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.delta = _check_delta(delta)
        a = torch.tensor(alpha, device=device, dtype=dtype or torch.get_default_dtype())
        if learn_alpha:
            self.alpha = nn.Parameter(a)
        else:
            self.register_buffer("alpha", a)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learn_alpha={isinstance(self.alpha, nn.Parameter)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"L2SoftmaxLinear expects in_features={self.in_features} in the last dimension, "
                f"got input of shape {tuple(x.shape)}"
            )
        return compact_linear(x, self.weight, self.bias, self.alpha, self.delta)
