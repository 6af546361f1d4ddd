"""Pieces shared by APGD, FAB, Square and AutoAttack (Croce & Hein 2020; Andriushchenko et al. 2020).

* :func:`dlr_loss` / :func:`dlr_loss_targeted`: the Difference of Logits Ratio losses (Croce & Hein
  2020, "Reliable evaluation ...", Sec. 4, eq. 6 and the targeted form of Sec. 5);
* :func:`apgd_checkpoints`: the iterations where APGD checks its step size (Sec. 3.2);
* per-sample norms, argument checks naming the bad argument.
"""
from __future__ import annotations

import math
from typing import List

import torch

NORMS = ("Linf", "L2")


def check_norm(norm) -> str:
    """``"Linf"`` or ``"L2"`` (also accepts ``"inf"``/``"linf"``/``"l2"``); ValueError otherwise."""
    if isinstance(norm, str):
        key = norm.strip().lower()
        if key in ("linf", "inf", "l_inf"):
            return "Linf"
        if key in ("l2", "l_2"):
            return "L2"
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def check_eps(eps) -> float:
    """The radius: a finite number > 0 (ValueError/TypeError naming ``eps``)."""
    if isinstance(eps, torch.Tensor) and eps.numel() == 1:
        eps = float(eps)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    return eps


def check_pos_int(v, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_unit(v, name: str, lo: float = 0.0, hi: float = 1.0, open_lo: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (open_lo and v == lo):
        raise ValueError(f"{name} must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}")
    return v


def check_targets(n_target_classes: int, num_classes: int, name: str = "n_target_classes") -> None:
    """ValueError when more target classes are asked than the model has other classes."""
    if n_target_classes > num_classes - 1:
        raise ValueError(f"{name}={n_target_classes} but the model has only {num_classes - 1} classes other "
                         f"than the true one ({num_classes} outputs)")


def lp_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm of ``t`` ``[N, ...]`` -> ``[N]``."""
    flat = t.reshape(t.shape[0], -1)
    if norm == "Linf":
        return flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    return flat.norm(dim=1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` per sample.

    ``logits`` ``[N, C]`` with C >= 3; ``pi`` orders the logits decreasingly (eq. 6).
    """
    zs, ind = logits.sort(dim=1)
    zy = logits.gather(1, y[:, None])[:, 0]
    top_is_y = (ind[:, -1] == y).to(logits.dtype)
    other = zs[:, -2] * top_is_y + zs[:, -1] * (1.0 - top_is_y)
    return -(zy - other) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (C >= 4)."""
    zs = logits.sort(dim=1)[0]
    zy = logits.gather(1, y[:, None])[:, 0]
    zt = logits.gather(1, target[:, None])[:, 0]
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def apgd_checkpoints(n_iter: int) -> List[int]:
    """Iterations (0-based, after which the step size is checked) of APGD's schedule.

    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` of ``n_iter``, with the
    interval lengths rounded down as in the authors' code (``int(0.22 n)``, ``int(0.03 n)``,
    ``int(0.06 n)``, each at least 1).
    """
    k = max(int(0.22 * n_iter), 1)
    decr = max(int(0.03 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    out, i = [], 0
    while True:
        i += k
        if i > n_iter:
            break
        out.append(i - 1)
        k = max(k - decr, k_min)
    return out


# Rows per model call and per CPU thread (see :func:`forward_rows`).
_CPU_ROW_PIXELS = 1 << 13
_CPU_MIN_ROWS = 64


def forward_rows(x: torch.Tensor) -> int:
    """Rows of ``x`` ``[R, ...]`` given to the model per forward(-backward) pass.

    On an accelerator all of them. On a CPU one huge pass is slower per row than a few smaller ones
    (the activations fall out of the per-core caches), and in eval mode rows do not interact, so
    APGD, FAB and Square split a large working batch (e.g. APGD-T's points x 9 targets) into passes
    of ``max(64, 8,192 // (H * W))`` rows per thread (``torch.get_num_threads()``): 128 digits of
    8x8 per thread, 64 images of 28x28 or 32x32. Measured on ``small_cnn`` at 8x8 (forward +
    input-backward per row, 873 rows, one thread): 26 / 21 / 22 / 22 / 27 / 29 us for passes of
    32 / 64 / 128 / 256 / 512 / 873 rows; FAB-T on 97 points x 9 targets, one thread: 3.5 / 3.8 /
    3.9 / 4.1 / 4.0 s for 96 / 128 / 192 / 256 / 873 rows, two threads: 2.2 / 2.4 / 2.8 s for
    256 / 128 / 873 (shared machine, load 2-4: noisy).
    """
    n = x.shape[0]
    if x.device.type != "cpu":
        return max(n, 1)
    plane = math.prod(x.shape[2:]) if x.dim() >= 4 else math.prod(x.shape[1:])
    per_thread = max(_CPU_MIN_ROWS, _CPU_ROW_PIXELS // max(1, plane))
    return max(1, per_thread * max(1, torch.get_num_threads()))


def row_slices(x: torch.Tensor) -> List[slice]:
    """The passes over the rows of ``x``: as few as :func:`forward_rows` allows, of equal size
    (270 rows -> 135 + 135, not 256 + 14)."""
    n, rows = x.shape[0], forward_rows(x)
    k = max(1, -(-n // rows))
    size = -(-n // k) if n else 1
    return [slice(s, min(s + size, n)) for s in range(0, n, size)] or [slice(0, 0)]


def in_row_passes(fn, x: torch.Tensor, *per_row):
    """``fn(x, *per_row)`` in the passes of :func:`row_slices`: each tensor of ``per_row`` (or None)
    is sliced with ``x``; the results (a tensor or a tuple of tensors, rows first) are concatenated."""
    parts = row_slices(x)
    if len(parts) == 1:
        return fn(x, *per_row)
    outs = [fn(x[sl], *(None if a is None else a[sl] for a in per_row)) for sl in parts]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(p) for p in zip(*outs))
    return torch.cat(outs)


def chunk_seed(seed, index: int):
    """The seed of chunk ``index`` of an evaluation (None stays None): chunks get independent streams."""
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + int(index) * 7919) % (2 ** 63 - 1)
