"""Fragile and null kernels of a conv layer (Pravin et al. 2021, papers/fragile-neurons-pravin2021.txt).

* :func:`kernel_dropout` - each kernel of a layer removed in turn, evaluated as one batched, exact
  computation (compiled consumer op ``robustops.ops.kernel_dropout_eval``); optional FGSM set and
  a first-order Taylor screen (:func:`taylor_importance`).
* :func:`fragile_split` - fragile S (removal drops performance below the mean line) / null S'.
* :func:`adversarial_targeting` - Algorithm 1: share of examples whose FGSM perturbation moves
  the layer's S kernels more than its S' kernels, per eps (one gradient for all eps).
* :func:`svd_filter`, :func:`gavish_donoho_lambda`, :func:`amplification_factor`,
  :func:`search_noise_level`, :func:`apply_filter` - the defence of Secs. 4.1-4.2.
* :mod:`robustops.fragile.plots` - Fig. 1 / Fig. 2-3 style plots (needs matplotlib).
"""
from .dropout import (DEFAULT_MEMORY_BUDGET, KernelDropoutResult, ablated_copy, kernel_dropout,
                      kernel_dropout_naive, variant_logits)
from .errors import (EmptyDatasetError, EmptySplitError, FragileError, LayerNotFoundError, MemoryBudgetError,
                     NoiseLevelError, NotAConvLayerError, SplitIndexError)
from .split import SPLIT_RULES, FragileSplit, fragile_split
from .svd_filter import (MODES, FilterReport, NoiseSearchResult, SVDFilterInfo, amplification_factor, apply_filter,
                         fgsm_accuracy, filter_layer_weights, filtered_model, gavish_donoho_lambda,
                         gavish_donoho_omega, search_noise_level, svd_filter, svd_threshold)
from .targeting import TargetingResult, adversarial_targeting
from .taylor import taylor_importance

__all__ = [
    "kernel_dropout", "kernel_dropout_naive", "variant_logits", "ablated_copy", "KernelDropoutResult",
    "DEFAULT_MEMORY_BUDGET", "taylor_importance",
    "fragile_split", "FragileSplit", "SPLIT_RULES", "adversarial_targeting", "TargetingResult",
    "gavish_donoho_lambda", "gavish_donoho_omega", "svd_threshold", "svd_filter", "SVDFilterInfo",
    "amplification_factor", "filter_layer_weights", "filtered_model", "search_noise_level", "NoiseSearchResult",
    "apply_filter", "FilterReport", "fgsm_accuracy", "MODES",
    "FragileError", "LayerNotFoundError", "NotAConvLayerError", "EmptyDatasetError", "MemoryBudgetError",
    "NoiseLevelError", "EmptySplitError", "SplitIndexError",
]
