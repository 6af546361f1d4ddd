"""L2-softmax head (Ranjan et al. 2017, "L2-constrained softmax loss"): the feature vector is
L2-normalised and scaled by alpha before the final linear layer."""
from __future__ import annotations

import math

from .compact import CompactLinear, _check_alpha_init

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


class L2SoftmaxLinear(CompactLinear):
    """Final classification layer of an L2-softmax network:
    ``logits = W (alpha * x / (||x||_2 + delta)) + b``.

    The same computation as :class:`CompactLinear` with head defaults: ``alpha`` fixed (a buffer;
    ``learn_alpha=True`` makes it a parameter) and > 0, ``delta`` only guarding all-zero features
    (default 1e-6). Use :func:`l2softmax_alpha_lower_bound` to pick alpha.
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
        if _check_alpha_init(alpha) <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        super().__init__(in_features, out_features, bias, device, dtype,
                         alpha=alpha, delta=delta, learn_alpha=learn_alpha)
