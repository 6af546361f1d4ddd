"""NIC: network invariant checking (Ma et al., NDSS 2019, "NIC: Detecting Adversarial Samples
with Neural Network Invariant Checking"), Sec. IV, fitted on clean images only.

* **Value invariants** (VI): per layer, a one-class SVM on the layer's activations of clean
  images (all of the layer's values, as in the paper). The activations are standardised and,
  when a layer has more than ``max_dims`` values, projected by PCA to ``max_dims`` components
  (fitted on the clean images; the first conv layer of Papernot's MNIST net has 21,632 values
  per image, too many for kernel SVMs on thousands of images). ``pool`` optionally average-pools conv maps first (off by default:
  pooling to 4 x 4 per channel averaged FGSM's pixel-wise noise away and cut the first conv
  layer's AUC on FGSM eps=0.1 from 0.98 to 0.41 in the README's digits experiment).
* **Provenance invariants** (PI): per layer a linear probe (softmax regression, trained on the
  clean images to predict the model's output class from the reduced activations); for each pair
  of adjacent layers a one-class SVM on the concatenated probe outputs ``[o_l, o_{l+1}]``.
  The probe outputs are **log**-probabilities by default (``probe_output="log_softmax"``): the
  probes fit clean training images almost perfectly, so their probabilities sit at the corners
  of the simplex; measured: on probabilities the provenance SVMs scored adversarial images,
  whose layers' probes disagree, as *more* typical than clean ones (AUC 0.02-0.49 per invariant
  in the README's experiment; likely mechanism: an RBF one-class SVM on near point masses puts
  its support vectors, hence its largest decision values, on the few in-between points). Log-probabilities keep the confidence spread and
  restore the intended ordering (AUC 0.62-0.93); ``"softmax"`` keeps the old behaviour.
* **Combination**: every SVM's decision value ``d_k(x)`` (positive inside the clean region) is
  standardised by its mean and spread on held-out clean images (the ``calibration`` fraction,
  not used to fit the SVMs or probes; on the training images the decision values are biased
  towards the inside); the score is ``max_k (-(d_k(x) - m_k) / s_k)`` (the most violated
  invariant) and the threshold is the ``1 - fpr`` quantile of the held-out images' scores.
  (The paper feeds the invariants' outputs to a final one-class classifier; the maximum of
  standardised violations is a simpler stand-in with one threshold.)

scikit-learn fits: ``OneClassSVM(kernel="rbf", gamma="scale", nu=nu)``, ``StandardScaler``; PCA by
torch SVD. scikit-learn is used for fitting only: the fitted state is copied into arrays
(:class:`_RBFOneClass`, :class:`_Scaler`) and every decision value is computed from those arrays
(float64), by the fitted detector and by one read back with :meth:`NICDetector.load` alike, so
the two score bit for bit the same. Save format: see :meth:`NICDetector.save`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import as_logits, check_images
from .._guard import frozen_model, model_device
from .base import Detector, ShapeMismatchError, read_saved
from .features import ActivationRecorder, _iter_images, select_layers

__all__ = ["NICDetector", "FORMAT"]

FORMAT = "robustops.detect.NICDetector/1"


class _Scaler:
    """Standardisation ``(a - mean) / scale`` from a fitted ``StandardScaler``'s ``mean_`` and
    ``scale_`` (float64 ``[d]``; constant features have scale 1), applied as scikit-learn does."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray):
        self.mean_ = np.ascontiguousarray(mean, dtype=np.float64)
        self.scale_ = np.ascontiguousarray(scale, dtype=np.float64)

    @classmethod
    def fit(cls, a: np.ndarray) -> "_Scaler":
        from sklearn.preprocessing import StandardScaler
        sk = StandardScaler().fit(a)
        return cls(sk.mean_, sk.scale_)

    def transform(self, a: np.ndarray) -> np.ndarray:
        return (a - self.mean_) / self.scale_


class _RBFOneClass:
    """Decision function of a fitted RBF one-class SVM (scikit-learn ``OneClassSVM``, libsvm),
    evaluated from its arrays in float64:

    ``d(z) = sum_i alpha_i exp(-gamma ||z - sv_i||^2) - rho``

    with ``sv = support_vectors_`` ``[S, d]``, ``alpha = dual_coef_[0]`` ``[S]``,
    ``rho = offset_`` (``= -intercept_``) and ``gamma = _gamma`` (the value ``gamma="scale"``
    resolved to at fit time). Squared distances are ``||z||^2 + ||sv||^2 - 2 z.sv`` (one matmul
    per block of rows, clamped at 0); this matches ``OneClassSVM.decision_function`` to ~1e-13
    (tested to 1e-10). Positive inside the learnt region.
    """

    def __init__(self, support_vectors, dual_coef, offset: float, gamma: float):
        self.support_vectors = torch.as_tensor(support_vectors, dtype=torch.float64).contiguous()
        self.dual_coef = torch.as_tensor(dual_coef, dtype=torch.float64).reshape(-1).contiguous()
        self.offset, self.gamma = float(offset), float(gamma)
        self._sv_sq = (self.support_vectors * self.support_vectors).sum(1)

    @classmethod
    def from_sklearn(cls, svm) -> "_RBFOneClass":
        if svm.kernel != "rbf":
            raise ValueError(f"only RBF one-class SVMs are supported, got kernel={svm.kernel!r}")
        offset = np.asarray(svm.offset_, dtype=np.float64).reshape(-1)
        if offset.shape != (1,) or np.asarray(svm.dual_coef_).shape[0] != 1:
            raise ValueError("expected a one-class SVM (one dual-coefficient row, one offset)")
        return cls(np.asarray(svm.support_vectors_, dtype=np.float64), np.asarray(svm.dual_coef_, dtype=np.float64),
                   float(offset[0]), float(svm._gamma))

    @property
    def n_features(self) -> int:
        return self.support_vectors.shape[1]

    def decision_function(self, z: np.ndarray, block: int = 1024) -> np.ndarray:
        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64))
        out = torch.empty(zt.shape[0], dtype=torch.float64)
        sv, sv_sq = self.support_vectors, self._sv_sq
        for s in range(0, zt.shape[0], block):
            zb = zt[s:s + block]
            d2 = ((zb * zb).sum(1, keepdim=True) + sv_sq) - 2.0 * (zb @ sv.T)
            out[s:s + block] = torch.exp(d2.clamp_min_(0.0).mul_(-self.gamma)) @ self.dual_coef - self.offset
        return out.numpy()

    def state_dict(self) -> Dict[str, object]:
        return {"support_vectors": self.support_vectors.clone(), "dual_coef": self.dual_coef.clone(),
                "offset": self.offset, "gamma": self.gamma}


class _PCA:
    """Exact PCA (torch SVD of the centred data, float64): ``transform(a) = (a - mean) @ V_k``."""

    def __init__(self, k: int):
        self.k = k

    def fit(self, a: np.ndarray) -> "_PCA":
        t = torch.from_numpy(a)
        self.mean_ = t.mean(0)
        _, _, vh = torch.linalg.svd(t - self.mean_, full_matrices=False)
        self.components_ = vh[: self.k].T.contiguous()
        return self

    def transform(self, a: np.ndarray) -> np.ndarray:
        return ((torch.from_numpy(a) - self.mean_) @ self.components_).numpy()


class _Probe:
    """Linear probe: softmax regression ``z -> class`` (L2-regularised cross-entropy, full-batch
    L-BFGS in torch, zero start: deterministic). ``predict_proba(z) -> [N, C]``."""

    def __init__(self, num_classes: int, l2: float = 1e-3, max_iter: int = 100):
        self.c, self.l2, self.max_iter = num_classes, l2, max_iter

    @classmethod
    def from_arrays(cls, w: torch.Tensor, b: torch.Tensor) -> "_Probe":
        probe = cls(int(w.shape[1]))
        probe.w, probe.b = w, b
        return probe

    def fit(self, z: np.ndarray, y: np.ndarray) -> "_Probe":
        x = torch.from_numpy(z).double()
        t = torch.from_numpy(y).long()
        w = torch.zeros(x.shape[1], self.c, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(self.c, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, t) + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.w, self.b = w.detach(), b.detach()
        return self

    def predict_proba(self, z: np.ndarray) -> np.ndarray:
        return F.softmax(torch.from_numpy(z).double() @ self.w + self.b, 1).numpy()

    def predict_log_proba(self, z: np.ndarray) -> np.ndarray:
        return F.log_softmax(torch.from_numpy(z).double() @ self.w + self.b, 1).numpy()


class NICDetector(Detector):
    """NIC detector: ``NICDetector(model, layers=None, nu=0.1).fit(x_clean)``.

    Args:
        model: classifier returning logits; never modified.
        layers: layers to check (default: every conv / linear layer, the logits layer included,
            as NIC checks every layer's values).
        nu: ``nu`` of each one-class SVM (upper bound on its training outlier fraction).
        fpr: fraction of held-out clean images flagged (sets ``threshold_``).
        pool: ``None`` (default): every activation value is kept (then PCA); an int: conv maps
            are average-pooled to at most ``pool x pool`` per channel first (cheaper, loses
            pixel-level perturbations).
        probe_output: ``"log_softmax"`` (default) or ``"softmax"``: what the provenance SVMs see
            of each layer's probe (see the module docstring for why log).
        max_dims: PCA components kept for layers wider than this.
        calibration: fraction of the clean images held out (at least 2) to standardise the
            invariants' decision values and set the threshold.
        max_train: at most this many clean images train the SVMs (kernel SVMs scale ~N^2).
        seed: PCA / split / probe seed.

    ``fit(x_clean, x_adv=None)`` uses clean images only; ``score`` returns the most violated
    invariant's standardised violation ``[N]``; ``predict`` is ``score > threshold_``.
    ``det.save(path)`` / ``NICDetector.load(path, model)``: plain tensors and numbers, read with
    ``torch.load(weights_only=True)`` (format in :meth:`save`); the loaded detector scores
    exactly as the saved one.
    """

    def __init__(self, model: nn.Module, layers=None, nu: float = 0.1, fpr: float = 0.05, *,
                 pool: Optional[int] = None, max_dims: int = 64, probe_output: str = "log_softmax",
                 calibration: float = 0.2, max_train: int = 3000, seed: int = 0, batch_size: int = 512):
        super().__init__(model, batch_size)
        self.layer_names = [n for n, _ in select_layers(model, layers, include_last=True)]
        for name, v, lo, hi in (("nu", nu, 0, 1), ("fpr", fpr, 0, 1), ("calibration", calibration, 0, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v < hi:
                raise ValueError(f"{name} must be a number in ({lo}, {hi}), got {v!r}")
        for name, v in (("pool", pool), ("max_dims", max_dims), ("max_train", max_train)):
            if name == "pool" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1{' or None' if name == 'pool' else ''}, got {v!r}")
        if probe_output not in ("log_softmax", "softmax"):
            raise ValueError(f"probe_output must be 'log_softmax' or 'softmax', got {probe_output!r}")
        self.probe_output = probe_output
        self.nu, self.fpr, self.calibration = float(nu), float(fpr), float(calibration)
        self.pool, self.max_dims, self.max_train, self.seed = pool, max_dims, max_train, seed

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        if self.pool is not None and out.dim() == 4 and (out.shape[2] > self.pool or out.shape[3] > self.pool):
            out = F.adaptive_avg_pool2d(out, (min(self.pool, out.shape[2]), min(self.pool, out.shape[3])))
        return out.flatten(1).float()

    def _activations(self, x):
        parts: List[List[torch.Tensor]] = [[] for _ in self.layer_names]
        preds: List[torch.Tensor] = []
        model = self.model
        with frozen_model(model), torch.no_grad(), ActivationRecorder(model, self.layer_names, reduce=self._reduce) as rec:
            dev = model_device(model)
            for xb in _iter_images(x, self.batch_size, "x"):
                check_images(xb, name="x")
                if getattr(self, "sample_shape_", None) is not None and tuple(xb.shape[1:]) != self.sample_shape_:
                    raise ShapeMismatchError(f"x holds images of shape {tuple(xb.shape[1:])}, expected {self.sample_shape_}")
                self._last_shape = tuple(xb.shape[1:])
                logits = as_logits(model(xb.to(dev)), xb.shape[0])
                self._n_classes = logits.shape[1]
                for i, n in enumerate(self.layer_names):
                    parts[i].append(rec.features[n].cpu())
                preds.append(logits.argmax(1).cpu())
        return [torch.cat(p).numpy().astype(np.float64) for p in parts], torch.cat(preds).numpy()

    def fit(self, x_clean, x_adv=None) -> "NICDetector":
        """Fit PCA, probes and one-class SVMs on clean images; calibrate the threshold.

        The scikit-learn ``OneClassSVM`` objects are kept in ``sklearn_svms_`` (value then
        provenance invariants, for reference); scoring uses their arrays (``vi_``, ``pi_``).

        The false-positive rate ``fpr`` holds for images like ``x_clean`` (drawn from the same
        distribution): for an FPR that holds on new data, pass clean images the model was not
        trained on when it may treat its training images differently (e.g. an overfitted model).
        It is an estimate from the ``calibration`` split (``n_cal`` images): from fit to fit the
        rate on new data spreads by about ``sqrt(fpr (1 - fpr) / n_cal)`` (0.011 for ``fpr`` 0.05
        and ``n_cal`` = 400; measured on Fashion-MNIST, 2,000 clean images, eight fits: 0.03-0.08
        on 4,000 clean test images); pass more clean images or raise ``calibration`` for a
        tighter one."""
        from sklearn.svm import OneClassSVM

        self.sample_shape_ = None
        acts, preds = self._activations(x_clean)
        self.sample_shape_ = self._last_shape
        n = acts[0].shape[0]
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(n)
        n_cal = max(2, int(round(self.calibration * n)))
        if n - n_cal < 10:
            raise ValueError(f"NIC needs at least ~10 clean training images besides the calibration split, got {n}")
        cal, tr = perm[:n_cal], perm[n_cal:][: self.max_train]
        self.reducers_, self.probes_, self.vi_, self.pi_ = [], [], [], []
        self.sklearn_svms_ = []
        self.layer_sizes_ = [int(a.shape[1]) for a in acts]
        reduced_tr, reduced_cal = [], []
        for a in acts:
            steps = [_Scaler.fit(a[tr])]
            z = steps[0].transform(a[tr])
            if z.shape[1] > self.max_dims:
                pca = _PCA(self.max_dims).fit(z)
                steps.append(pca)
                z = pca.transform(z)
            self.reducers_.append(steps)
            reduced_tr.append(z)
            reduced_cal.append(self._apply(steps, a[cal]))
        self.num_classes_ = int(self._n_classes)
        for z in reduced_tr:
            self.sklearn_svms_.append(OneClassSVM(kernel="rbf", gamma="scale", nu=self.nu).fit(z))
            self.vi_.append(_RBFOneClass.from_sklearn(self.sklearn_svms_[-1]))
            self.probes_.append(_Probe(self.num_classes_).fit(z, preds[tr]))
        prov_tr = [self._probe(p, z) for p, z in zip(self.probes_, reduced_tr)]
        for i in range(len(prov_tr) - 1):
            self.sklearn_svms_.append(OneClassSVM(kernel="rbf", gamma="scale", nu=self.nu).fit(
                np.hstack([prov_tr[i], prov_tr[i + 1]])))
            self.pi_.append(_RBFOneClass.from_sklearn(self.sklearn_svms_[-1]))
        # standardise each SVM's decision values on the held-out clean images
        d_cal = self._decisions(reduced_cal)
        self.loc_ = d_cal.mean(0)
        self.scale_ = np.maximum(d_cal.std(0), 1e-12)
        s_cal = self._combine(d_cal)
        self.threshold_ = float(np.quantile(s_cal, 1 - self.fpr))
        self._fitted = True
        return self

    @staticmethod
    def _apply(steps, a: np.ndarray) -> np.ndarray:
        for s in steps:
            a = s.transform(a)
        return a

    def _probe(self, probe, z: np.ndarray) -> np.ndarray:
        return probe.predict_log_proba(z) if self.probe_output == "log_softmax" else probe.predict_proba(z)

    def _decisions(self, reduced: List[np.ndarray]) -> np.ndarray:
        cols = [vi.decision_function(z) for vi, z in zip(self.vi_, reduced)]
        prov = [self._probe(p, z) for p, z in zip(self.probes_, reduced)]
        cols += [pi.decision_function(np.hstack([prov[i], prov[i + 1]])) for i, pi in enumerate(self.pi_)]
        return np.stack(cols, 1)

    def _combine(self, d: np.ndarray) -> np.ndarray:
        return (-(d - self.loc_) / self.scale_).max(1)

    @property
    def invariant_names(self) -> List[str]:
        """Names of the invariants, in the column order of :meth:`invariant_scores`:
        ``"value:<layer>"`` for each layer, then ``"provenance:<layer>-><next layer>"``."""
        names = self.layer_names
        return [f"value:{n}" for n in names] + [f"provenance:{a}->{b}" for a, b in zip(names, names[1:])]

    def invariant_scores(self, x) -> torch.Tensor:
        """Standardised violation of every invariant ``[N, K]`` (float64, CPU; columns as
        :attr:`invariant_names`; higher = less like the clean images). ``score`` is the row max."""
        self._check_fitted("invariant_scores")
        acts, _ = self._activations(x)
        reduced = [self._apply(steps, a) for steps, a in zip(self.reducers_, acts)]
        return torch.from_numpy(-(self._decisions(reduced) - self.loc_) / self.scale_)

    def score(self, x) -> torch.Tensor:
        """Standardised violation of the most violated invariant ``[N]`` (float64, CPU)."""
        return self.invariant_scores(x).amax(1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the fitted detector to ``path`` with ``torch.save``.

        Format (``FORMAT`` = "robustops.detect.NICDetector/1"): one dict of plain Python values
        (str, int, float, None, lists, dicts) and float64 CPU tensors only; ``L`` checked layers,
        ``C`` classes, ``d_l`` values of layer ``l`` (after ``pool``), ``r_l`` its reduced width
        (``min(d_l, max_dims)``), ``S`` support vectors of an SVM, ``K = 2L - 1`` invariants:

        * ``format``; ``config``: ``layers`` (names), ``nu``, ``fpr``, ``pool``, ``max_dims``,
          ``probe_output``, ``calibration``, ``max_train``, ``seed``, ``batch_size``;
        * ``num_classes`` (C), ``sample_shape`` (one image's shape), ``layer_sizes`` ([d_l]);
        * ``reducers``: per layer ``scaler_mean`` / ``scaler_scale`` ``[d_l]`` (the fitted
          ``StandardScaler``'s ``mean_`` / ``scale_``), ``pca_mean`` ``[d_l]`` and
          ``pca_components`` ``[d_l, r_l]`` (both ``None`` when the layer is not wider than
          ``max_dims``);
        * ``probes``: per layer ``weight`` ``[r_l, C]`` and ``bias`` ``[C]``;
        * ``value_svms`` (L) and ``provenance_svms`` (L - 1): per RBF one-class SVM
          ``support_vectors`` ``[S, r_l]`` (provenance: ``[S, 2C]``), ``dual_coef`` ``[S]``,
          ``offset`` (libsvm's rho, ``= -intercept_``) and ``gamma`` (floats);
        * ``loc`` / ``scale`` ``[K]``: the invariants' standardisation on the held-out clean
          images; ``threshold`` (float).

        No scikit-learn object is pickled: :meth:`load` reads the file with
        ``torch.load(weights_only=True)``, which refuses any other object. The model's weights
        are not stored (pass the model to ``load``).

        Raises:
            NotFittedError: called before ``fit``.
        """
        self._check_fitted("save")
        reducers = []
        for steps in self.reducers_:
            pca = steps[1] if len(steps) > 1 else None
            reducers.append({"scaler_mean": torch.from_numpy(steps[0].mean_.copy()),
                             "scaler_scale": torch.from_numpy(steps[0].scale_.copy()),
                             "pca_mean": None if pca is None else pca.mean_.clone(),
                             "pca_components": None if pca is None else pca.components_.clone()})
        state = {
            "format": FORMAT,
            "config": {"layers": list(self.layer_names), "nu": self.nu, "fpr": self.fpr, "pool": self.pool,
                       "max_dims": self.max_dims, "probe_output": self.probe_output,
                       "calibration": self.calibration, "max_train": self.max_train, "seed": self.seed,
                       "batch_size": self.batch_size},
            "num_classes": int(self.num_classes_),
            "sample_shape": [int(s) for s in self.sample_shape_],
            "layer_sizes": [int(s) for s in self.layer_sizes_],
            "reducers": reducers,
            "probes": [{"weight": p.w.clone(), "bias": p.b.clone()} for p in self.probes_],
            "value_svms": [v.state_dict() for v in self.vi_],
            "provenance_svms": [v.state_dict() for v in self.pi_],
            "loc": torch.from_numpy(np.array(self.loc_, dtype=np.float64)),
            "scale": torch.from_numpy(np.array(self.scale_, dtype=np.float64)),
            "threshold": float(self.threshold_),
        }
        torch.save(state, os.fspath(path))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: nn.Module) -> "NICDetector":
        """Read a detector written by :meth:`save` for ``model`` (the architecture it was fitted
        on). The loaded detector's ``score`` / ``predict`` equal the saved one's bit for bit
        (same arrays, same float64 arithmetic); ``sklearn_svms_`` is ``None``.

        Uses ``torch.load(weights_only=True)``: a file holding anything but tensors and plain
        containers raises ``pickle.UnpicklingError`` instead of running code. ``model`` runs once
        on a blank image of the saved shape to check it; it is not changed.

        Raises:
            ValueError: ``path`` is not a saved NICDetector (no or another ``format`` tag, e.g. a
                RelevantNeuronDetector file), or its contents are malformed (missing keys, wrong
                shapes or dtypes, non-finite values); ``model`` lacks a saved layer, cannot run
                on the saved image shape, or its layers / logits have other sizes than saved.
        """
        where = repr(os.fspath(path))
        state = read_saved(path, FORMAT, "NICDetector")
        try:
            det = cls._from_state(state, model, where)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"{where} is a malformed NICDetector file ({type(e).__name__}: {e})") from None
        # the model must produce the saved layer widths and number of classes
        x0 = torch.zeros((1,) + det.sample_shape_)
        try:
            acts, _ = det._activations(x0)
        except RuntimeError as e:
            raise ValueError(f"model cannot run on the saved image shape {det.sample_shape_} ({e}): load the "
                             "detector with the model it was fitted for") from None
        sizes = [int(a.shape[1]) for a in acts]
        if sizes != det.layer_sizes_ or det._n_classes != det.num_classes_:
            raise ValueError(f"model's layers {det.layer_names} give {sizes} values and {det._n_classes} classes, the "
                             f"saved detector {det.layer_sizes_} and {det.num_classes_}: load it with the model it "
                             "was fitted for")
        det._fitted = True
        return det

    @classmethod
    def _from_state(cls, state: dict, model: nn.Module, where: str) -> "NICDetector":
        def bad(msg):
            return ValueError(f"{where} is a malformed NICDetector file: {msg}")

        def arr(t, shape, what):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float64:
                raise bad(f"{what} must be a float64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
                raise bad(f"{what} has shape {tuple(t.shape)}, expected {tuple('*' if w is None else w for w in shape)}")
            if not bool(torch.isfinite(t).all()):
                raise bad(f"{what} holds non-finite values")
            return t.contiguous()

        def num(v, what, positive=False):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
                raise bad(f"{what} must be a finite{' positive' if positive else ''} number, got {v!r}")
            return float(v)

        cfg = state["config"]
        det = cls(model, layers=list(cfg["layers"]), nu=cfg["nu"], fpr=cfg["fpr"], pool=cfg["pool"],
                  max_dims=cfg["max_dims"], probe_output=cfg["probe_output"], calibration=cfg["calibration"],
                  max_train=cfg["max_train"], seed=cfg["seed"], batch_size=cfg["batch_size"])
        n_layers = len(det.layer_names)
        c = state["num_classes"]
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise bad(f"num_classes must be an int >= 1, got {c!r}")
        sizes = [int(s) for s in state["layer_sizes"]]
        if len(sizes) != n_layers or min(sizes) < 1:
            raise bad(f"layer_sizes {sizes} do not match the {n_layers} saved layers")
        shape = tuple(int(s) for s in state["sample_shape"])
        if not shape or min(shape) < 1:
            raise bad(f"sample_shape {shape} is not an image shape")
        reducers, probes, widths = state["reducers"], state["probes"], []
        vis, pis = state["value_svms"], state["provenance_svms"]
        if len(reducers) != n_layers or len(probes) != n_layers or len(vis) != n_layers or len(pis) != n_layers - 1:
            raise bad(f"expected {n_layers} reducers, probes and value SVMs and {n_layers - 1} provenance SVMs, got "
                      f"{len(reducers)}, {len(probes)}, {len(vis)}, {len(pis)}")
        det.reducers_ = []
        for l, (r, d) in enumerate(zip(reducers, sizes)):
            scale = arr(r["scaler_scale"], (d,), f"reducers[{l}].scaler_scale")
            if bool((scale <= 0).any()):
                raise bad(f"reducers[{l}].scaler_scale must be positive")
            steps = [_Scaler(arr(r["scaler_mean"], (d,), f"reducers[{l}].scaler_mean").numpy(), scale.numpy())]
            if (r["pca_mean"] is None) != (r["pca_components"] is None):
                raise bad(f"reducers[{l}] holds only half of a PCA")
            if r["pca_components"] is not None:
                comp = arr(r["pca_components"], (d, None), f"reducers[{l}].pca_components")
                pca = _PCA(comp.shape[1])
                pca.mean_, pca.components_ = arr(r["pca_mean"], (d,), f"reducers[{l}].pca_mean"), comp
                steps.append(pca)
            det.reducers_.append(steps)
            widths.append(steps[-1].components_.shape[1] if len(steps) > 1 else d)
        det.probes_ = [_Probe.from_arrays(arr(p["weight"], (w, c), f"probes[{l}].weight"),
                                          arr(p["bias"], (c,), f"probes[{l}].bias"))
                       for l, (p, w) in enumerate(zip(probes, widths))]

        def svm(v, dim, what):
            sv = arr(v["support_vectors"], (None, dim), f"{what}.support_vectors")
            if sv.shape[0] < 1:
                raise bad(f"{what} has no support vector")
            return _RBFOneClass(sv, arr(v["dual_coef"], (sv.shape[0],), f"{what}.dual_coef"),
                                num(v["offset"], f"{what}.offset"), num(v["gamma"], f"{what}.gamma", positive=True))

        det.vi_ = [svm(v, w, f"value_svms[{l}]") for l, (v, w) in enumerate(zip(vis, widths))]
        det.pi_ = [svm(v, 2 * c, f"provenance_svms[{l}]") for l, v in enumerate(pis)]
        k = 2 * n_layers - 1
        det.loc_ = arr(state["loc"], (k,), "loc").numpy()
        det.scale_ = arr(state["scale"], (k,), "scale").numpy()
        if bool((det.scale_ <= 0).any()):
            raise bad("scale must be positive")
        det.threshold_ = num(state["threshold"], "threshold")
        det.num_classes_, det.layer_sizes_, det.sample_shape_ = c, sizes, shape
        det.sklearn_svms_ = None
        return det
