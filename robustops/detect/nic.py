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

scikit-learn: ``OneClassSVM(kernel="rbf", gamma="scale", nu=nu)``, ``StandardScaler``; PCA by
torch SVD.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import as_logits, check_images
from .._guard import frozen_model, model_device
from .base import Detector, ShapeMismatchError
from .features import ActivationRecorder, _iter_images, select_layers

__all__ = ["NICDetector"]


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
        """Fit PCA, probes and one-class SVMs on clean images; calibrate the threshold."""
        from sklearn.preprocessing import StandardScaler
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
        reduced_tr, reduced_cal = [], []
        for a in acts:
            steps = [StandardScaler().fit(a[tr])]
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
            self.vi_.append(OneClassSVM(kernel="rbf", gamma="scale", nu=self.nu).fit(z))
            self.probes_.append(_Probe(self.num_classes_).fit(z, preds[tr]))
        prov_tr = [self._probe(p, z) for p, z in zip(self.probes_, reduced_tr)]
        for i in range(len(prov_tr) - 1):
            self.pi_.append(OneClassSVM(kernel="rbf", gamma="scale", nu=self.nu).fit(
                np.hstack([prov_tr[i], prov_tr[i + 1]])))
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
