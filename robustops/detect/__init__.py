"""Detect adversarial inputs (papers/relevant-neurons-detection-granda.txt and its baselines).

=============================  ==============================================================
``RelevantNeuronDetector``     Granda et al.: relevant neurons per class (mu-Lasso, Sec. 4.1)
                               + random forest on their responses (Sec. 4.2, Alg. 1-2)
``FeatureSqueezingDetector``   Xu et al. 2018: L1 distance of softmax outputs under squeezing
``NICDetector``                Ma et al. 2019: value + provenance invariants (one-class SVMs)
``select_squeezers``           Feature Squeezing's squeezers for a data set, from clean images
``evaluate_detector``          accuracy, TPR, FPR, ROC AUC on held-out clean/adversarial sets
``ActivationRecorder``         forward hooks (context manager) recording per-layer features
``relevant_neurons``           relevant neuron indices per class from features and labels
``mu_lasso``                   spectral projected gradient for the mu-Lasso (Eq. 1)
=============================  ==============================================================

Every detector: ``det.fit(x_clean, x_adv)`` (images ``[N, ...]`` in [0, 1] or DataLoaders;
returns ``det``), ``det.score(x) -> Tensor[N]`` (higher = more adversarial),
``det.predict(x) -> BoolTensor[N]`` (True = adversarial). See docs/detection.md.
"""
from .base import Detector, NoAdversarialError, NotFittedError, ShapeMismatchError, evaluate_detector
from .features import ActivationRecorder, Extracted, NoLayersError, extract, neuron_features, normalize_features, select_layers
from .forest import TensorForest
from .lasso import MuLassoConvergenceWarning, MuLassoResult, mu_lasso, project_l1_ball
from .nic import NICDetector
from .relevant import RelevantNeuronDetector, relevant_neurons
from .squeeze import FeatureSqueezingDetector, bit_depth, median_filter, select_squeezers, squeezer_agreement

__all__ = [
    "RelevantNeuronDetector", "FeatureSqueezingDetector", "NICDetector", "ActivationRecorder",
    "relevant_neurons", "mu_lasso", "evaluate_detector",
    "Detector", "NotFittedError", "ShapeMismatchError", "NoAdversarialError", "NoLayersError",
    "MuLassoResult", "MuLassoConvergenceWarning", "project_l1_ball", "neuron_features", "normalize_features", "select_layers",
    "TensorForest", "bit_depth", "median_filter", "extract", "Extracted", "select_squeezers", "squeezer_agreement",
]
