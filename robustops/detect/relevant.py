"""Relevant-neuron detector of adversarial inputs (Granda et al., Sec. 4, Alg. 1-2).

1. Neuron descriptors of clean and adversarial images (:mod:`robustops.detect.features`).
2. Relevant neurons per class: the support of ``w_j`` of the mu-Lasso (Eq. 1) on the clean
   images labelled with the model's predictions (``r_clean``) and, separately, on the
   adversarial images labelled with their (adversarial) predictions (``r_adv``).
3. Per class the selected set is ``r_clean & r_adv`` (``variant="shared"``), ``r_clean``
   (``"clean"``) or ``r_clean ^ r_adv`` (``"symdiff"``).
4. The classifier's input concatenates, for every class j, the descriptor values of j's selected
   neurons. ``use_label=True`` ("With-Label" in the paper) keeps only the block of the predicted
   class and zeroes the others; ``use_label=False`` passes every block.
5. A scikit-learn ``RandomForestClassifier`` separates clean (0) from adversarial (1). After
   fitting it is converted to tensors (:class:`~robustops.detect.forest.TensorForest`) so
   scoring is batched torch work on the model's device and saving needs no pickle.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .._checks import as_logits, check_images
from .._guard import frozen_model, model_device
from .base import Detector, NoAdversarialError, NotFittedError, ShapeMismatchError, read_saved
from .features import NORMALIZATIONS, ActivationRecorder, _iter_images, extract, normalize_features, select_layers
from .forest import TensorForest
from .lasso import _check_mu, mu_lasso

#: mu-Lasso iteration cap of the detector. With the active-set polish the solves of the README
#: tables converge (relative duality gap 1e-4, most to ~1e-12) in 100-13,000 iterations at mu=10
#: and 20 (m = 592, N = 300-600); at mu=100 with N < m some nearly interpolate and reach this
#: cap (warned). The earlier cap of 1,000 without the polish stopped short, with supports 5% to
#: 3.4x larger than the optimum's (spurious small weights, whose number depended on the path).
DETECTOR_MAX_ITER = 50000

__all__ = ["relevant_neurons", "RelevantNeuronDetector", "VARIANTS", "FORMAT"]

VARIANTS = ("shared", "clean", "symdiff")
#: ``format`` entry of a saved detector file.
FORMAT = "robustops.detect.RelevantNeuronDetector/1"


def relevant_neurons(features: torch.Tensor, labels: torch.Tensor, mu, num_classes: Optional[int] = None, *,
                     return_weights: bool = False, **solver_kw):
    """Relevant neurons of every class (Granda et al., Alg. 1 step 6): the non-zero rows of
    ``w_j`` in ``argmin ||X W - L||^2 s.t. ||w_j||_1 <= mu`` (:func:`mu_lasso`).

    Args:
        features: descriptors ``[N, m]`` (one row per image, e.g. from :func:`neuron_features`).
        labels: int64 class of each row ``[N]`` (the model's prediction), in ``[0, num_classes)``.
        mu: L1 budget per class (> 0); larger mu selects more neurons.
        num_classes: C (default ``max(labels) + 1``). A class absent from ``labels`` gets an
            all-zero target column, hence ``w_j = 0`` and no relevant neuron.
        return_weights: also return ``W [m, C]``.
        **solver_kw: passed to :func:`mu_lasso` (``tol``, ``max_iter``, ``mode``).

    Returns:
        a list of C sorted int64 index tensors (neurons into the m features), or
        ``(list, W)`` with ``return_weights``.

    Raises:
        ValueError: ``mu <= 0``, mismatched shapes, labels out of range. TypeError: float labels.

    Warns:
        MuLassoConvergenceWarning: (from :func:`mu_lasso`) the solve stopped at ``max_iter``
        before meeting ``tol``.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a tensor [N, m], got {getattr(features, 'shape', type(features))}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor [N] of class indices")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be [N] = [{features.shape[0]}], got shape {tuple(labels.shape)}")
    labels = labels.long()
    c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(f"labels must lie in [0, {c}), got [{int(labels.min())}, {int(labels.max())}]")
    _check_mu(mu, c, torch.float64, torch.device("cpu"))
    Y = torch.nn.functional.one_hot(labels.to(features.device), c)
    res = mu_lasso(features, Y, mu, **solver_kw)
    sets = [torch.nonzero(res.W[:, j] != 0).flatten().cpu() for j in range(c)]
    return (sets, res.W) if return_weights else sets


def _combine(clean: torch.Tensor, adv: torch.Tensor, variant: str) -> torch.Tensor:
    a, b = set(clean.tolist()), set(adv.tolist())
    out = a & b if variant == "shared" else a if variant == "clean" else a ^ b
    return torch.tensor(sorted(out), dtype=torch.int64)


class RelevantNeuronDetector(Detector):
    """Detect adversarial inputs from the responses of each class's relevant neurons.

    Args:
        model: classifier returning ``(N, C)`` logits; never modified (runs under
            ``frozen_model``; hooks removed on exit).
        mu: mu-Lasso L1 budget (> 0). The paper uses 10, 20, 100.
        variant: ``"shared"`` (r_clean & r_adv, Alg. 2), ``"clean"`` (r_clean), ``"symdiff"``
            (r_clean ^ r_adv).
        use_label: zero every class block but the predicted class's ("With-Label").
        n_estimators: trees of the random forest (the paper: 1000).
        layers: layers to take neurons from (default every conv / linear layer but the last).
        normalize: ``"l2"`` (default, Alg. 1 as printed; selects the paper's share of
            neurons) or ``"sum_l2"`` (about 10x sparser at the same mu); see
            :mod:`robustops.detect.features`.
        seed: random state of the forest.
        n_jobs: forest training jobs (scikit-learn's ``n_jobs``).
        batch_size: images per forward pass.
        solver_kw: options of :func:`mu_lasso` (default here ``max_iter=DETECTOR_MAX_ITER``
            (50,000), ``tol=1e-4``: the relative duality gap). A solve that stops at the cap
            warns (:class:`~robustops.detect.lasso.MuLassoConvergenceWarning`): the relevant sets
            of an unconverged solution are larger than the optimum's and path-dependent.

    After ``fit``: ``relevant`` (per class: ``clean`` / ``adv`` / ``shared`` / ``symdiff``
    neuron indices, into the m features; ``neuron_names()`` maps them to ``layer:channel``),
    ``W_clean_`` / ``W_adv_`` ``[m, C]``, ``classifier_`` (the scikit-learn forest, not kept by
    ``load``), ``forest_`` (its tensor form used for scoring), ``n_features_``.

    Raises (constructor): ``ValueError`` for mu <= 0, unknown variant / normalize, bad
    n_estimators; :class:`~robustops.detect.features.NoLayersError` for a model without
    conv / linear layers.
    """

    def __init__(self, model: nn.Module, mu: float = 10, variant: str = "shared", use_label: bool = True,
                 n_estimators: int = 1000, layers=None, normalize: str = "l2", seed: Optional[int] = 0,
                 n_jobs: Optional[int] = None, batch_size: int = 512, solver_kw: Optional[dict] = None):
        super().__init__(model, batch_size)
        _check_mu(mu, 1, torch.float64, torch.device("cpu"))
        self.mu = float(mu)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if isinstance(n_estimators, bool) or not isinstance(n_estimators, int) or n_estimators < 1:
            raise ValueError(f"n_estimators must be an int >= 1, got {n_estimators!r}")
        self.variant = variant
        self.use_label = bool(use_label)
        self.n_estimators = n_estimators
        self.layer_names = [n for n, _ in select_layers(model, layers)]
        self.normalize = normalize
        self.seed = seed
        self.n_jobs = n_jobs
        self.solver_kw = dict(solver_kw or {})
        self.threshold_ = 0.5
        self.relevant: Dict[int, Dict[str, List[int]]] = {}

    # ------------------------------------------------------------------ fitting
    def fit(self, x_clean, x_adv, only_successful: bool = True) -> "RelevantNeuronDetector":
        """Select the relevant neurons and train the forest (Alg. 2).

        Args:
            x_clean: clean images ``[N, ...]`` in [0, 1], or an iterable of batches.
            x_adv: adversarial images. With ``only_successful=True`` (default) ``x_adv[i]``
                must be the attacked ``x_clean[i]`` (same N, same order) and only the pairs
                whose prediction changed are used as adversarial examples (all clean images are
                used as clean examples). With ``False`` every ``x_adv`` image is used and N may
                differ.

        Returns: self.

        Raises:
            ShapeMismatchError: images of different shapes, or different N with
                ``only_successful=True``.
            NoAdversarialError: no adversarial image changed the model's prediction.
            ValueError: no neuron selected for any class (raise mu or change variant).
        """
        clean = extract(self.model, x_clean, self.layer_names, self.normalize, self.batch_size, name="x_clean")
        adv = extract(self.model, x_adv, self.layer_names, self.normalize, self.batch_size, name="x_adv",
                      sample_shape=clean.sample_shape)
        return self.fit_features(clean.features, clean.predictions, adv.features, adv.predictions,
                                 num_classes=clean.num_classes, only_successful=only_successful,
                                 layer_sizes=clean.sizes, sample_shape=clean.sample_shape)

    def fit_features(self, f_clean: torch.Tensor, p_clean: torch.Tensor, f_adv: torch.Tensor, p_adv: torch.Tensor,
                     num_classes: int, only_successful: bool = True, layer_sizes: Optional[Sequence[int]] = None,
                     sample_shape: Optional[Sequence[int]] = None,
                     relevant: Optional[Dict[int, Dict[str, List[int]]]] = None) -> "RelevantNeuronDetector":
        """:meth:`fit` from precomputed descriptors (``[N, m]``, as :func:`extract` returns them
        with this detector's ``layers`` and ``normalize``) and the model's predictions ``[N]``.
        Lets an experiment reuse one feature extraction for many settings (mu, variant, label).
        ``layer_sizes`` / ``sample_shape``: those of the extraction (``Extracted.sizes`` /
        ``.sample_shape``); ``fit`` passes them. ``relevant``: the ``relevant`` dict of a detector
        fitted on the same data with the same mu (skips the two mu-Lasso solves)."""
        if layer_sizes is not None:
            self.layer_sizes_ = [int(v) for v in layer_sizes]
        if sample_shape is not None:
            self.sample_shape_ = tuple(int(v) for v in sample_shape)
        if f_clean.dim() != 2 or f_adv.dim() != 2 or f_clean.shape[1] != f_adv.shape[1]:
            raise ShapeMismatchError(f"clean features {tuple(f_clean.shape)} and adversarial features "
                                     f"{tuple(f_adv.shape)} differ in width")
        if only_successful:
            if f_adv.shape[0] != f_clean.shape[0]:
                raise ShapeMismatchError(
                    f"x_clean has {f_clean.shape[0]} images and x_adv {f_adv.shape[0]}; with only_successful=True "
                    "x_adv[i] must be the attacked x_clean[i] (pass only_successful=False for unpaired sets)")
            ok = p_adv != p_clean
            if not bool(ok.any()):
                raise NoAdversarialError("the attack succeeded on no example: every x_adv[i] gets the same prediction "
                                         "as x_clean[i]; nothing to learn adversarial neurons from")
            f_adv, p_adv = f_adv[ok], p_adv[ok]
        elif f_adv.shape[0] == 0:
            raise NoAdversarialError("x_adv holds no example")
        self.n_adv_used_ = int(f_adv.shape[0])
        c = int(num_classes)
        self.num_classes_ = c
        self.n_features_ = int(f_clean.shape[1])
        if not hasattr(self, "layer_sizes_") or not hasattr(self, "sample_shape_"):
            raise ValueError("fit_features needs layer_sizes and sample_shape (Extracted.sizes / .sample_shape)")
        if sum(self.layer_sizes_) != f_clean.shape[1]:
            raise ShapeMismatchError(f"layer_sizes sum to {sum(self.layer_sizes_)} but the features have "
                                     f"{f_clean.shape[1]} columns")
        if relevant is not None:
            if sorted(relevant) != list(range(c)):
                raise ValueError(f"relevant must have one entry per class 0..{c - 1}")
            self.relevant = {int(j): {k: list(v) for k, v in d.items()} for j, d in relevant.items()}
            self.W_clean_ = self.W_adv_ = None
        else:
            kw = {"max_iter": DETECTOR_MAX_ITER, "tol": 1e-4, **self.solver_kw}
            sets_c, self.W_clean_ = relevant_neurons(f_clean.double(), p_clean, self.mu, c, return_weights=True, **kw)
            sets_a, self.W_adv_ = relevant_neurons(f_adv.double(), p_adv, self.mu, c, return_weights=True, **kw)
            self.relevant = {}
            for j in range(c):
                rc, ra = sets_c[j], sets_a[j]
                self.relevant[j] = {"clean": rc.tolist(), "adv": ra.tolist(),
                                    "shared": _combine(rc, ra, "shared").tolist(),
                                    "symdiff": _combine(rc, ra, "symdiff").tolist()}
        self._build_index()
        if self._index.numel() == 0:
            raise ValueError(f"no relevant neuron selected for any class with variant={self.variant!r}, mu={self.mu}: "
                             "raise mu or use variant='clean'")
        z_clean = self._design(f_clean, p_clean)
        z_adv = self._design(f_adv, p_adv)
        from sklearn.ensemble import RandomForestClassifier
        z = torch.cat([z_clean, z_adv]).cpu().numpy()
        y = np.r_[np.zeros(z_clean.shape[0], np.int64), np.ones(z_adv.shape[0], np.int64)]
        rf = RandomForestClassifier(n_estimators=self.n_estimators, random_state=self.seed, n_jobs=self.n_jobs)
        rf.fit(z, y)
        self.classifier_ = rf
        self.forest_ = TensorForest.from_sklearn(rf)
        self._compile_forest()
        self._fitted = True
        return self

    def _compile_forest(self) -> None:
        """Inference form of the forest: reads the selected neurons straight from the ``[N, m]``
        descriptors, and with ``use_label`` resolves every split on another class's block in
        advance (those inputs are 0), per predicted class (:meth:`TensorForest.specialize`)."""
        self._forest_eval = self.forest_.specialize(self._index, self._block if self.use_label else None,
                                                    num_groups=self.num_classes_)
        # the layers the forest reads: with "l2" each layer is normalised on its own, so score /
        # predict compute only those (often the small late layers: no hooks, no norms on the
        # large early feature maps); "sum_l2" normalises the whole vector, so it needs them all
        start = np.r_[0, np.cumsum(self.layer_sizes_)]
        layer_of = np.searchsorted(start, self._index.numpy(), side="right") - 1
        read = sorted(set(layer_of.tolist())) if self.normalize == "l2" else list(range(len(self.layer_names)))
        self._read_layers = [self.layer_names[i] for i in read]
        column = torch.full((self.n_features_,), -1, dtype=torch.int64)
        width = 0
        for i in read:
            column[start[i]:start[i + 1]] = torch.arange(width, width + self.layer_sizes_[i])
            width += self.layer_sizes_[i]
        self._read_columns = (column, width)
        self._forest_read = self._forest_eval.reading(column, width)

    def _build_index(self) -> None:
        key = "clean" if self.variant == "clean" else self.variant
        idx, block = [], []
        for j in range(self.num_classes_):
            sel = self.relevant[j][key]
            idx.extend(sel)
            block.extend([j] * len(sel))
        self._index = torch.tensor(idx, dtype=torch.int64)
        self._block = torch.tensor(block, dtype=torch.int64)

    def _design(self, feats: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
        """Classifier input ``[N, sum_j |S_j|]``: class blocks of the selected neurons' values."""
        idx = self._index.to(feats.device)
        z = feats.index_select(1, idx).float()
        if self.use_label:
            z = z * (self._block.to(feats.device)[None, :] == preds[:, None]).to(z.dtype)
        return z

    # ------------------------------------------------------------------ inference
    def features_and_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised descriptors ``[N, m]`` and logits ``[N, C]`` of one batch, one forward."""
        return self._features_and_logits(x, self.layer_names)

    def _features_and_logits(self, x: torch.Tensor, layers: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The normalised descriptors of ``layers`` (concatenated, ``[N, sum of their units]``)
        and the logits, from one forward with hooks on those layers only."""
        check_images(x, name="x")
        if tuple(x.shape[1:]) != self.sample_shape_:
            raise ShapeMismatchError(f"x holds images of shape {tuple(x.shape[1:])}, the detector was fitted on "
                                     f"{self.sample_shape_}")
        model = self.model
        with frozen_model(model, freeze_params=False), torch.no_grad(), ActivationRecorder(model, layers) as rec:
            logits = as_logits(model(x.to(model_device(model, x.device))), x.shape[0])
            feats = normalize_features([rec.features[n] for n in layers], self.normalize)
        return feats, logits

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        """``score`` of one batch: one forward with hooks on the layers the forest reads only."""
        feats, logits = self._features_and_logits(x, self._read_layers)
        if self._forest_read.device != feats.device:         # one copy of the tables per device
            if self._forest_eval.device != feats.device:
                self._forest_eval = self._forest_eval.to(feats.device)
            self._forest_read = self._forest_eval.reading(*self._read_columns)
        return self._forest_read.predict_proba(feats, logits.argmax(1) if self.use_label else None, column=1)

    def score(self, x) -> torch.Tensor:
        """``P(adversarial)`` per image ``[N]`` (float64, on the model's device): the forest's
        averaged leaf fractions of class 1, equal to scikit-learn's ``predict_proba`` (float64, so
        that ``predict`` = ``score > 0.5`` equals the forest's ``predict``). ``x``: images ``[N, ...]``
        in [0, 1] or batches. One forward per batch, hooked only on the layers that hold a
        selected neuron (with ``normalize="l2"``; every layer with ``"sum_l2"``): the same values
        as ``score_features(*features_and_logits(x))``, without computing the other layers."""
        self._check_fitted("score")
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and 0 < x.shape[0] <= self.batch_size:   # one batch
            return self._score_batch(x)
        out = [self._score_batch(xb) for xb in _iter_images(x, self.batch_size, "x")]
        return out[0] if len(out) == 1 else torch.cat(out)

    def score_features(self, feats: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
        """``P(adversarial)`` ``[N]`` (float64) from precomputed descriptors ``[N, m]`` and
        predictions ``[N]``."""
        self._check_fitted("score_features")
        if feats.dim() != 2 or feats.shape[1] != self.n_features_:
            raise ShapeMismatchError(f"features must be [N, {self.n_features_}], got {tuple(feats.shape)}")
        # equal to the scikit-learn forest's predict_proba(design)[:, 1], without building the design
        if self._forest_eval.device != feats.device:
            self._forest_eval = self._forest_eval.to(feats.device)
        return self._forest_eval.predict_proba(feats, preds if self.use_label else None, column=1)

    def neuron_names(self, indices: Optional[Sequence[int]] = None) -> List[str]:
        """``"layer:unit"`` names of feature indices (all m by default)."""
        sizes = getattr(self, "layer_sizes_", None)
        if sizes is None:
            raise NotFittedError("neuron_names() needs a fitted detector")
        names = [f"{layer}:{u}" for layer, k in zip(self.layer_names, sizes) for u in range(k)]
        return names if indices is None else [names[i] for i in indices]

    def selected_count(self) -> List[int]:
        """Number of selected neurons per class (for the chosen variant)."""
        self._check_fitted("selected_count")
        key = self.variant
        return [len(self.relevant[j][key]) for j in range(self.num_classes_)]

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the fitted detector to ``path`` with ``torch.save``.

        Format (``FORMAT`` = "robustops.detect.RelevantNeuronDetector/1"): one dict of plain
        Python values (str, int, float, bool, lists, dicts) and tensors only — the settings,
        layer names and sizes, the relevant sets, ``W_clean`` / ``W_adv`` and the random forest
        as node arrays (:meth:`TensorForest.state_dict`). No scikit-learn object is pickled, so
        :meth:`load` reads it with ``torch.load(weights_only=True)``, which refuses any other
        object. The model's weights are not stored (pass the model to ``load``).
        """
        self._check_fitted("save")
        state = {
            "format": FORMAT,
            "config": {"mu": self.mu, "variant": self.variant, "use_label": self.use_label,
                       "n_estimators": self.n_estimators, "layers": list(self.layer_names),
                       "normalize": self.normalize, "seed": self.seed, "batch_size": self.batch_size},
            "num_classes": self.num_classes_, "layer_sizes": list(self.layer_sizes_),
            "sample_shape": list(self.sample_shape_), "n_features": self.n_features_,
            "n_adv_used": self.n_adv_used_,
            "relevant": {str(j): {k: list(v) for k, v in d.items()} for j, d in self.relevant.items()},
            "W_clean": None if self.W_clean_ is None else self.W_clean_.detach().cpu(),
            "W_adv": None if self.W_adv_ is None else self.W_adv_.detach().cpu(),
            "forest": self.forest_.state_dict(),
        }
        torch.save(state, os.fspath(path))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: nn.Module) -> "RelevantNeuronDetector":
        """Read a detector written by :meth:`save` for ``model`` (same architecture).

        Uses ``torch.load(weights_only=True)``: a file holding anything but tensors and plain
        containers raises (``pickle.UnpicklingError``) instead of running code. Raises
        ``ValueError`` when the file is not a detector of this format, or when ``model`` lacks
        the saved layers or gives a different number of neurons.
        """
        state = read_saved(path, FORMAT, "RelevantNeuronDetector")
        cfg = state["config"]
        det = cls(model, mu=cfg["mu"], variant=cfg["variant"], use_label=cfg["use_label"],
                  n_estimators=cfg["n_estimators"], layers=cfg["layers"], normalize=cfg["normalize"],
                  seed=cfg["seed"], batch_size=cfg["batch_size"])
        det.num_classes_ = int(state["num_classes"])
        det.layer_sizes_ = [int(s) for s in state["layer_sizes"]]
        det.sample_shape_ = tuple(int(s) for s in state["sample_shape"])
        det.n_features_ = int(state["n_features"])
        det.n_adv_used_ = int(state["n_adv_used"])
        det.relevant = {int(j): {k: [int(i) for i in v] for k, v in d.items()} for j, d in state["relevant"].items()}
        det.W_clean_, det.W_adv_ = state["W_clean"], state["W_adv"]
        det.forest_ = TensorForest.from_state_dict(state["forest"])
        det.classifier_ = None
        det._build_index()
        if det._index.numel() and int(det._index.max()) >= det.n_features_:
            raise ValueError("saved relevant sets index beyond the saved number of features")
        if det.forest_.feature.numel() and int(det.forest_.feature.max()) >= max(det._index.numel(), 1):
            raise ValueError("saved forest uses more inputs than the relevant sets provide")
        det._compile_forest()
        # the model must produce the saved neurons: one forward of a blank image checks it
        x0 = torch.zeros((1,) + det.sample_shape_)
        with frozen_model(model), torch.no_grad(), ActivationRecorder(model, det.layer_names) as rec:
            as_logits(model(x0.to(model_device(model))), 1)
            sizes = [rec.features[n].shape[1] for n in det.layer_names]
        if sizes != det.layer_sizes_:
            raise ValueError(f"model's layers {det.layer_names} give {sizes} neurons, the saved detector "
                             f"{det.layer_sizes_}: load it with the model it was fitted for")
        det._fitted = True
        return det
