"""AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): APGD-CE, APGD-T, FAB-T and Square, each run only on
the points every earlier attack left correctly classified; a point is robust when none breaks it.

Versions (the authors' settings):

=========== ======================================================================================
standard    APGD-CE (100 steps, 1 restart), APGD-T (targeted DLR, 9 targets, 100 steps), FAB-T
            (9 targets, 100 steps), Square (5,000 queries, p_init 0.8)
plus        APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square, APGD-T, FAB-T
rand        APGD-CE and APGD-DLR with expectation over transformation (20 gradient samples per
            step), for randomized models
fast        NOT AutoAttack: APGD-CE (100 steps) + APGD-T (3 targets); a cheap upper bound on
            robust accuracy for quick reports (documented as such in ``last_result.version``)
=========== ======================================================================================

``attacks=[...]`` runs a custom list: names (``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``, ``"fab"``,
``"fab-t"``, ``"square"``) or configured :class:`APGD`/:class:`APGDT`/:class:`FAB`/:class:`Square`
objects.

Integrity flags (``last_result.flags``, also emitted as warnings of the named classes): zero input
gradient on correctly classified points; outputs that already sum to 1; a non-deterministic model;
Square breaking points the white-box attacks left robust; robust accuracy not near 0 at a very
large eps; (:meth:`AutoAttack.curve`) robust accuracy not decreasing with eps.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import _distributed as dist
from .._checks import _is_pair, as_logits, check_bounds, check_images, check_labels, iter_batches
from .._gradients import autograd_on
from .._guard import frozen_model, model_device
from ._aa import check_eps, check_norm, check_pos_int, chunk_seed
from .apgd import APGD, APGDT
from .base import Attack, _normal
from .fab import FAB
from .square import Square

__all__ = [
    "AutoAttack", "AutoAttackResult", "AutoAttackFlag", "AutoAttackWarning", "ZeroGradientWarning",
    "ProbabilityOutputWarning", "RandomizedModelWarning", "GradientMaskingWarning", "NonMonotonicAccuracyWarning",
    "LargeEpsAccuracyWarning", "VERSIONS", "ATTACK_NAMES",
]

VERSIONS = ("standard", "plus", "rand", "fast", "custom")
ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


# ---- integrity flags ----------------------------------------------------------------------------
class AutoAttackWarning(UserWarning):
    """Base of the integrity flags: the evaluation may overstate robustness."""
    flag = "autoattack"


class ZeroGradientWarning(AutoAttackWarning):
    flag = "zero_gradient"


class ProbabilityOutputWarning(AutoAttackWarning):
    flag = "probability_output"


class RandomizedModelWarning(AutoAttackWarning):
    flag = "randomized_model"


class GradientMaskingWarning(AutoAttackWarning):
    flag = "square_beats_white_box"


class NonMonotonicAccuracyWarning(AutoAttackWarning):
    flag = "accuracy_not_decreasing"


class LargeEpsAccuracyWarning(AutoAttackWarning):
    flag = "not_zero_at_large_eps"


@dataclasses.dataclass
class AutoAttackFlag:
    """One integrity flag: ``name`` (stable id), ``message`` (what was seen, what to do), ``category``."""
    name: str
    message: str
    category: type = AutoAttackWarning

    def __str__(self) -> str:
        return f"[{self.name}] {self.message}"


@dataclasses.dataclass
class AutoAttackResult:
    """Outcome of an AutoAttack run (``aa.last_result``; stable field names).

    Attributes:
        norm, eps, version: the threat model and the attack set; attacks: attack names in run order.
        n: number of points; clean_accuracy / robust_accuracy: fractions in [0, 1].
        accuracy_after: robust accuracy after each attack (cumulative, in run order).
        broken_by: per point, ``None`` (robust), ``"clean"`` (misclassified without attack) or the
            name of the first attack that broke it.
        correct, robust: ``[N]`` bool tensors (clean correct; robust to every attack).
        time: seconds per attack name plus ``"clean"``, ``"checks"``, ``"large_eps"`` and ``"total"``
            (under torchrun: summed over ranks).
        flags: list of :class:`AutoAttackFlag` (empty: nothing suspicious seen).
        large_eps_accuracy: APGD-CE accuracy at a very large eps on the points left robust
            (fraction of all points), or None when the check was off.
        stats: raw counters behind the flags.
    """
    norm: str
    eps: float
    version: str
    attacks: List[str]
    n: int
    clean_accuracy: float
    robust_accuracy: float
    accuracy_after: Dict[str, float]
    broken_by: List[Optional[str]]
    correct: torch.Tensor
    robust: torch.Tensor
    time: Dict[str, float]
    flags: List[AutoAttackFlag]
    large_eps_accuracy: Optional[float] = None
    stats: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def flag_names(self) -> List[str]:
        return [f.name for f in self.flags]

    def summary(self) -> str:
        parts = [f"AutoAttack {self.version} {self.norm} eps={self.eps:g} on {self.n} points: "
                 f"clean {100 * self.clean_accuracy:.2f}%, robust {100 * self.robust_accuracy:.2f}%"]
        for k, v in self.accuracy_after.items():
            parts.append(f"  after {k:<8} {100 * v:6.2f}%  ({self.time.get(k, 0.0):.1f} s)")
        parts.append(f"  total time {self.time.get('total', 0.0):.1f} s")
        for f in self.flags:
            parts.append(f"  FLAG {f}")
        return "\n".join(parts)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["correct"] = self.correct.tolist()
        d["robust"] = self.robust.tolist()
        d["flags"] = [{"name": f.name, "message": f.message} for f in self.flags]
        return d


# ---- the ensemble -------------------------------------------------------------------------------
_CODE_ROBUST, _CODE_CLEAN = 0, 1  # per-point codes; attack k (0-based) -> k + 2


class AutoAttack:
    """AutoAttack: the standard, parameter-free robustness evaluation (Croce & Hein 2020).

    Args:
        model: classifier returning logits ``(N, C)`` for inputs in ``[lo, hi]`` (normalisation
            inside the model).
        norm: ``"Linf"`` or ``"L2"``; eps: radius (finite, > 0, pixel units).
        version: ``"standard"`` | ``"plus"`` | ``"rand"`` | ``"fast"`` (not AutoAttack, see module doc);
            ``attacks=[...]``: custom list (names or configured attack objects).
        seed: seeds every random part; chunk ``k`` of the data gets its own derived seed, so a
            result does not depend on how the chunks are spread over torchrun ranks.
        batch_size: points per chunk (the unit of checkpointing and sharding; default 1000).
        checks: run the integrity checks (flags); large_eps_check: also APGD-CE at a very large
            eps (Linf: ``hi - lo``; L2: ``(hi - lo) sqrt(d)``) on the points left robust.
        warn: emit each flag as a warning of its class.

    Use: ``x_adv = aa(x, y)`` (tensors; ``aa.last_result``) or ``aa.evaluate(loader_or_pair,
    checkpoint=PATH)`` (streams batches, never holds the data set; resumes from ``PATH``).
    Raises ``ValueError``/``TypeError`` naming the argument (eps <= 0 or not finite, unknown norm,
    version or attack name, n_target_classes above C - 1, labels out of range, non-logit output).
    """

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 8 / 255, version: str = "standard",
                 attacks: Optional[Sequence] = None, seed: Optional[int] = 0, *, lo: float = 0.0, hi: float = 1.0,
                 batch_size: int = 1000, checks: bool = True, large_eps_check: bool = True, warn: bool = True,
                 progress: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.norm = check_norm(norm)
        self.eps = check_eps(eps)
        if attacks is not None:
            if version not in ("standard", "custom"):
                raise ValueError(f"attacks=[...] runs a custom list; do not also pass version={version!r}")
            version = "custom"
            if isinstance(attacks, (str, Attack)) or len(attacks) == 0:
                raise ValueError("attacks must be a non-empty list of attack names or attack objects")
        elif version not in VERSIONS or version == "custom":
            raise ValueError(f"version must be one of {VERSIONS[:4]} (or pass attacks=[...]), got {version!r}")
        self.version = version
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        self.seed = seed
        self.lo, self.hi = check_bounds(lo, hi)
        self.batch_size = check_pos_int(batch_size, "batch_size")
        self.checks = bool(checks)
        self.large_eps_check = bool(large_eps_check)
        self.warn = bool(warn)
        self.progress = bool(progress)
        self.attacks = self._build(attacks)
        self.last_result: Optional[AutoAttackResult] = None

    # ---- configuration ----------------------------------------------------------------------
    def _named(self, name: str):
        kw = dict(norm=self.norm, eps=self.eps, seed=self.seed, lo=self.lo, hi=self.hi)
        v = self.version
        if name == "apgd-ce":
            return APGD(self.model, loss="ce", steps=100, n_restarts=5 if v == "plus" else 1,
                        eot_iter=20 if v == "rand" else 1, **kw)
        if name == "apgd-dlr":
            return APGD(self.model, loss="dlr", steps=100, n_restarts=5 if v == "plus" else 1,
                        eot_iter=20 if v == "rand" else 1, **kw)
        if name == "apgd-t":
            return APGDT(self.model, steps=100, n_target_classes=3 if v == "fast" else 9, n_restarts=1, **kw)
        if name == "fab":
            return FAB(self.model, steps=100, targeted=False, n_restarts=5, **kw)
        if name == "fab-t":
            return FAB(self.model, steps=100, targeted=True, n_target_classes=9, n_restarts=1, **kw)
        if name == "square":
            return Square(self.model, n_queries=5000, p_init=0.8, n_restarts=1, **kw)
        raise ValueError(f"unknown attack {name!r}; known: {ATTACK_NAMES}")

    def _build(self, attacks):
        order = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
                 "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
                 "rand": ["apgd-ce", "apgd-dlr"],
                 "fast": ["apgd-ce", "apgd-t"]}
        self._auto_targets = set()  # attacks built here: target count capped at C - 1 at run time
        if attacks is None:
            self._auto_targets = set(order[self.version])
            return [(n, self._named(n)) for n in order[self.version]]
        out = []
        for a in attacks:
            if isinstance(a, str):
                out.append((a, self._named(a)))
                self._auto_targets.add(a)
            elif isinstance(a, (APGD, FAB, Square)):
                if a.model is not self.model:
                    raise ValueError(f"attack {a.name!r} was built for another model")
                out.append((a.name, a))
            else:
                raise TypeError(f"attacks must hold names {ATTACK_NAMES} or APGD/APGDT/FAB/Square objects, "
                                f"got {type(a).__name__}")
        names = [n for n, _ in out]
        if len(set(names)) != len(names):
            raise ValueError(f"attack names must be unique, got {names}")
        return out

    @property
    def attack_names(self) -> List[str]:
        return [n for n, _ in self.attacks]

    def _fingerprint(self) -> dict:
        keys = ("steps", "n_restarts", "loss", "rho", "eot_iter", "n_target_classes", "fab_targeted", "n_queries",
                "p_init", "alpha_max", "eta", "beta", "norm", "eps", "seed")
        attacks = [{"name": n, **{k: ("auto" if k == "n_target_classes" and n in self._auto_targets else getattr(a, k))
                                  for k in keys if hasattr(a, k)}} for n, a in self.attacks]
        return {"norm": self.norm, "eps": self.eps, "version": self.version, "attacks": attacks,
                "seed": self.seed, "lo": self.lo, "hi": self.hi, "batch_size": self.batch_size}

    def __repr__(self) -> str:
        return (f"AutoAttack(norm={self.norm!r}, eps={self.eps:g}, version={self.version!r}, "
                f"attacks={self.attack_names}, seed={self.seed})")

    # ---- one chunk --------------------------------------------------------------------------
    def _logits(self, x):
        return as_logits(self.model(x), x.shape[0])

    def _check_chunk(self, x, y, logits, correct, stats):
        """Cheap integrity counters on one chunk (added into ``stats``)."""
        n = x.shape[0]
        stats["checked"] = stats.get("checked", 0) + n
        probs = bool((logits.min() > -1e-5) & (logits.max() < 1 + 1e-5)
                     & ((logits.sum(1) - 1).abs() < 1e-5).all())
        stats["prob_chunks"] = stats.get("prob_chunks", 0) + int(probs)
        stats["chunks"] = stats.get("chunks", 0) + 1
        if self.version != "rand":
            with torch.no_grad():
                again = self._logits(x)
            a = logits / (logits.norm(dim=1, keepdim=True) + 1e-10)
            b = again / (again.norm(dim=1, keepdim=True) + 1e-10)
            differ = ((a - b).norm(dim=1) > 1e-4) | (again.argmax(1) != logits.argmax(1))
            stats["nondeterministic"] = stats.get("nondeterministic", 0) + int(differ.sum())
        idx = correct.nonzero()[:, 0]
        if idx.numel():
            xr = x[idx].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(self._logits(xr), y[idx], reduction="sum")
                g, = torch.autograd.grad(loss, xr)
            zero = g.reshape(idx.numel(), -1).abs().sum(1) == 0
            stats["zero_grad"] = stats.get("zero_grad", 0) + int(zero.sum())
            stats["correct_checked"] = stats.get("correct_checked", 0) + idx.numel()

    def _run_chunk(self, x, y, ci: int, stats: dict, times: dict, keep_adv: bool):
        """Attack one chunk; returns ``(codes [n] int8, x_adv or None)``."""
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self._logits(x)
        if int(y.max()) >= logits.shape[1]:
            raise ValueError(f"y holds class {int(y.max())} but the model has {logits.shape[1]} outputs")
        correct = logits.argmax(1) == y
        codes = torch.where(correct, _CODE_ROBUST, _CODE_CLEAN).to(torch.int8)
        times["clean"] = times.get("clean", 0.0) + time.perf_counter() - t0
        if self.checks:
            t0 = time.perf_counter()
            self._check_chunk(x, y, logits, correct, stats)
            times["checks"] = times.get("checks", 0.0) + time.perf_counter() - t0
        x_adv = x.clone() if keep_adv else None
        for k, (name, atk) in enumerate(self.attacks):
            todo = (codes == _CODE_ROBUST).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            t0 = time.perf_counter()
            atk.num_classes = logits.shape[1]
            if name in self._auto_targets and hasattr(atk, "n_target_classes"):
                # the standard 9 targets, or every other class when the model has fewer than 10
                atk.n_target_classes = min(3 if (self.version == "fast" and name == "apgd-t") else 9,
                                           logits.shape[1] - 1)
            if hasattr(atk, "_check_classes"):
                atk._check_classes(logits.shape[1])
            s = chunk_seed(self.seed if atk.seed is None else atk.seed, ci)
            atk.generator = None
            if s is not None:
                atk.generator = torch.Generator(device=x.device)
                atk.generator.manual_seed(s + k)
            success, adv = atk.perturb(x[todo], y[todo])
            # verify: a counted break must be a valid example (inside the ball and the box, misclassified)
            if bool(success.any()):
                hit = todo[success]
                adv_hit = adv[success]
                with torch.no_grad():
                    wrong = self._logits(adv_hit).argmax(1) != y[hit]
                delta = (adv_hit - x[hit]).reshape(hit.numel(), -1)
                dn = delta.abs().amax(1) if self.norm == "Linf" else delta.norm(dim=1)
                valid = wrong & (dn <= self.eps * (1 + 1e-5) + 1e-7) & (adv_hit >= self.lo).reshape(
                    hit.numel(), -1).all(1) & (adv_hit <= self.hi).reshape(hit.numel(), -1).all(1)
                stats["invalid_" + name] = stats.get("invalid_" + name, 0) + int((~valid).sum())
                hit = hit[valid]
                codes[hit] = k + 2
                if keep_adv:
                    x_adv[hit] = adv_hit[valid]
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            if hasattr(atk, "stats") and "zero_grad" in getattr(atk, "stats", {}):
                stats["zero_grad_" + name] = stats.get("zero_grad_" + name, 0) + atk.stats["zero_grad"]
        if self.large_eps_check:
            t0 = time.perf_counter()
            todo = (codes == _CODE_ROBUST).nonzero()[:, 0]
            if todo.numel():
                d = x[0].numel()
                big = (self.hi - self.lo) * (1.0 if self.norm == "Linf" else math.sqrt(d))
                probe = APGD(self.model, norm=self.norm, eps=big, steps=50, loss="ce", seed=self.seed, lo=self.lo,
                             hi=self.hi)
                probe.num_classes = logits.shape[1]
                probe.generator = None
                s = chunk_seed(self.seed, ci)
                if s is not None:
                    probe.generator = torch.Generator(device=x.device)
                    probe.generator.manual_seed(s + 1000)
                ok, _ = probe.perturb(x[todo], y[todo])
                stats["large_eps_robust"] = stats.get("large_eps_robust", 0) + int((~ok).sum())
            times["large_eps"] = times.get("large_eps", 0.0) + time.perf_counter() - t0
        return codes, x_adv

    # ---- drivers ----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples ``[N, ...]`` (``x`` where robust or clean-misclassified); sets
        ``self.last_result``. Under torchrun the chunks are spread over ranks and every rank gets
        the whole result."""
        check_images(x, self.lo, self.hi)
        y = check_labels(y, x.shape[0])
        n = x.shape[0]
        if n == 0:
            from .._checks import EmptyDataError
            raise EmptyDataError("x holds no example")
        chunks = [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        rank, world = dist.world()
        c0, c1 = dist.shard_range(len(chunks)) if world > 1 else (0, len(chunks))
        device = model_device(self.model, default=x.device)
        stats, times, codes, advs = {}, {}, [], []
        t_start = time.perf_counter()
        with frozen_model(self.model), autograd_on():
            for ci in range(c0, c1):
                s, e = chunks[ci]
                xb = _normal(x[s:e].detach().to(device))
                yb = _normal(y[s:e].to(device))
                c, adv = self._run_chunk(xb, yb, ci, stats, times, keep_adv=True)
                codes.append(c.cpu())
                advs.append(adv.to(x.device))
        times["total"] = time.perf_counter() - t_start
        codes_t = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.int8)
        x_adv = torch.cat(advs) if advs else x[:0].clone()
        if world > 1:
            codes_t = dist.gather_cat(codes_t)
            x_adv = dist.gather_cat(x_adv.cpu()).to(x.device)
        self.last_result = self._finish(codes_t, stats, times)
        return x_adv

    def evaluate(self, data, checkpoint: Optional[str] = None) -> AutoAttackResult:
        """Stream ``data`` (a DataLoader / iterable of ``(x, y, ...)`` batches, or an ``(x, y)`` pair
        split into ``batch_size`` chunks); each batch is one chunk. ``checkpoint=PATH`` stores the
        per-point verdicts after every chunk and, when the file exists, skips the chunks it holds
        (same settings required, else ValueError). Under torchrun each rank attacks a contiguous
        block of the chunks (the data must have ``len()``) and rank 0's result holds all points."""
        rank, world = dist.world()
        if world > 1:
            try:
                n_chunks = math.ceil(data[0].shape[0] / self.batch_size) if _is_pair(data) else len(data)
            except TypeError:
                raise TypeError("under torchrun, evaluate needs data with len() (a DataLoader or an (x, y) pair)") \
                    from None
            c0, c1 = dist.shard_range(n_chunks)
        else:
            c0, c1 = 0, None
        path = None
        if checkpoint is not None:
            path = os.fspath(checkpoint) + (f".rank{rank}" if world > 1 else "")
        state = self._load_checkpoint(path)
        stats, times = dict(state["stats"]), dict(state["times"])
        t_start = time.perf_counter()
        codes: Dict[int, torch.Tensor] = dict(state["chunks"])
        device = None
        with frozen_model(self.model), autograd_on():
            for ci, (xb, yb) in enumerate(iter_batches(data, self.batch_size)):
                if ci < c0 or (c1 is not None and ci >= c1):
                    continue
                if ci in codes:
                    continue
                check_images(xb, self.lo, self.hi, name="x")
                yb = check_labels(yb, xb.shape[0])
                if device is None:
                    device = model_device(self.model, default=xb.device)
                c, _ = self._run_chunk(_normal(xb.detach().to(device)), _normal(yb.to(device)), ci, stats, times,
                                       keep_adv=False)
                codes[ci] = c.cpu()
                if path is not None:
                    self._save_checkpoint(path, codes, stats, times)
        times["total"] = times.get("total", 0.0) + time.perf_counter() - t_start
        ordered = [codes[k] for k in sorted(codes)]
        codes_t = torch.cat(ordered) if ordered else torch.zeros(0, dtype=torch.int8)
        if world > 1:
            codes_t = dist.gather_cat(codes_t)
        if codes_t.numel() == 0:
            from .._checks import EmptyDataError
            raise EmptyDataError("data yielded no examples")
        self.last_result = self._finish(codes_t, stats, times)
        return self.last_result

    def curve(self, data, eps: Sequence[float]) -> List[AutoAttackResult]:
        """AutoAttack at every ``eps`` (same settings); adds the flag ``accuracy_not_decreasing``
        to every result when robust accuracy rises with eps by more than 0.5 points."""
        eps_list = [check_eps(e) for e in eps]
        if not eps_list:
            raise ValueError("eps must hold at least one value")
        results = []
        saved = self.eps
        try:
            for e in sorted(eps_list):
                self.eps = e
                for _, atk in self.attacks:
                    atk.eps = e
                results.append(self.evaluate(data))
        finally:
            self.eps = saved
            for _, atk in self.attacks:
                atk.eps = saved
        accs = [r.robust_accuracy for r in results]
        bad = [(results[i].eps, results[i + 1].eps) for i in range(len(accs) - 1) if accs[i + 1] > accs[i] + 0.005]
        if bad:
            f = AutoAttackFlag(NonMonotonicAccuracyWarning.flag,
                               f"robust accuracy rises with eps between {bad} (accuracies {accs}): the attacks "
                               f"are failing (gradient masking?); check the model with adaptive attacks",
                               NonMonotonicAccuracyWarning)
            for r in results:
                r.flags.append(f)
            if self.warn:
                warnings.warn(str(f), NonMonotonicAccuracyWarning, stacklevel=2)
        return results

    # ---- results, flags, checkpoints -------------------------------------------------------
    def _finish(self, codes: torch.Tensor, stats: dict, times: dict) -> AutoAttackResult:
        if dist.world()[1] > 1:
            # the same key list on every rank (a rank may have seen no event of some kind)
            names = self.attack_names
            skeys = ["checked", "prob_chunks", "chunks", "nondeterministic", "zero_grad", "correct_checked",
                     "large_eps_robust"] + [p + n for n in names for p in ("invalid_", "zero_grad_")]
            tkeys = ["clean", "checks", "large_eps", "total"] + names
            vec = torch.tensor([float(stats.get(k, 0.0)) for k in skeys] + [float(times.get(k, 0.0)) for k in tkeys],
                               dtype=torch.float64)
            present = torch.tensor([float(k in stats) for k in skeys] + [float(k in times) for k in tkeys],
                                   dtype=torch.float64)
            vec, present = dist.all_reduce_sum(vec), dist.all_reduce_sum(present)
            stats = {k: vec[i].item() for i, k in enumerate(skeys) if present[i] > 0}
            times = {k: vec[len(skeys) + i].item() for i, k in enumerate(tkeys) if present[len(skeys) + i] > 0}
        n = codes.numel()
        names = self.attack_names
        correct = codes != _CODE_CLEAN
        robust = codes == _CODE_ROBUST
        broken_by = [None if c == _CODE_ROBUST else ("clean" if c == _CODE_CLEAN else names[c - 2])
                     for c in codes.tolist()]
        acc_after, left = {}, int(correct.sum())
        for k, name in enumerate(names):
            left -= int((codes == k + 2).sum())
            acc_after[name] = left / n
        flags = self._flags(stats, acc_after, correct, n)
        large = None
        if self.large_eps_check and "large_eps_robust" in stats:
            large = stats["large_eps_robust"] / n
        elif self.large_eps_check:
            large = 0.0
        res = AutoAttackResult(norm=self.norm, eps=self.eps, version=self.version, attacks=names, n=n,
                               clean_accuracy=float(correct.float().mean()), robust_accuracy=float(robust.float().mean()),
                               accuracy_after=acc_after, broken_by=broken_by, correct=correct, robust=robust,
                               time={k: float(v) for k, v in times.items()}, flags=flags, large_eps_accuracy=large,
                               stats={k: float(v) for k, v in stats.items()})
        if self.warn:
            for f in flags:
                warnings.warn(str(f), f.category, stacklevel=3)
        return res

    def _flags(self, stats: dict, acc_after: dict, correct: torch.Tensor, n: int) -> List[AutoAttackFlag]:
        flags = []
        if stats.get("zero_grad", 0) > 0:
            z, m = int(stats["zero_grad"]), int(stats.get("correct_checked", 0))
            flags.append(AutoAttackFlag(ZeroGradientWarning.flag,
                                        f"{z} of {m} correctly classified points have an exactly zero input gradient "
                                        f"(cross-entropy): saturated logits, quantisation or a non-differentiable "
                                        f"step; gradient attacks (FGSM/PGD/APGD-CE) cannot move them",
                                        ZeroGradientWarning))
        if stats.get("chunks", 0) and stats.get("prob_chunks", 0) == stats.get("chunks", 0):
            flags.append(AutoAttackFlag(ProbabilityOutputWarning.flag,
                                        "the model's outputs are in [0, 1] and sum to 1 (softmax inside the model?): "
                                        "attacks need logits; remove the final softmax",
                                        ProbabilityOutputWarning))
        if stats.get("nondeterministic", 0) > 0:
            flags.append(AutoAttackFlag(RandomizedModelWarning.flag,
                                        f"two forward passes differ on {int(stats['nondeterministic'])} points: a "
                                        f"randomized model; use version='rand' (expectation over transformation)",
                                        RandomizedModelWarning))
        names = list(acc_after)
        if "square" in names and len(names) > 1 and names.index("square") > 0:
            before = acc_after[names[names.index("square") - 1]]
            if before - acc_after["square"] > 0.002:
                flags.append(AutoAttackFlag(GradientMaskingWarning.flag,
                                            f"Square (gradient-free) lowered robust accuracy from {100 * before:.2f}% to "
                                            f"{100 * acc_after['square']:.2f}% after the white-box attacks: gradient "
                                            f"masking; the white-box numbers are not trustworthy",
                                            GradientMaskingWarning))
        if self.large_eps_check and stats.get("large_eps_robust", 0) / max(n, 1) > 0.05:
            flags.append(AutoAttackFlag(LargeEpsAccuracyWarning.flag,
                                        f"{100 * stats['large_eps_robust'] / n:.2f}% of the points survive APGD-CE at "
                                        f"a huge eps (the whole box): the attack is not working on this model "
                                        f"(masked or zero gradients)",
                                        LargeEpsAccuracyWarning))
        for k, v in stats.items():
            if k.startswith("invalid_") and v > 0:
                flags.append(AutoAttackFlag("invalid_example",
                                            f"{int(v)} examples from {k[8:]} failed the final validity check and were "
                                            f"not counted (non-deterministic model?)", RandomizedModelWarning))
        return flags

    def _load_checkpoint(self, path: Optional[str]) -> dict:
        empty = {"fingerprint": self._fingerprint(), "chunks": {}, "stats": {}, "times": {}}
        if path is None or not os.path.exists(path):
            return empty
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("fingerprint") != self._fingerprint():
            raise ValueError(f"checkpoint {path!r} was written with other settings "
                             f"({state.get('fingerprint') if isinstance(state, dict) else '?'}); expected "
                             f"{self._fingerprint()}: delete it or pass another path")
        return state

    def _save_checkpoint(self, path: str, chunks: dict, stats: dict, times: dict) -> None:
        tmp = path + ".tmp"
        torch.save({"fingerprint": self._fingerprint(), "chunks": chunks, "stats": stats, "times": times}, tmp)
        os.replace(tmp, path)
