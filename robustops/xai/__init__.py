"""Explanations of attacks (Klawikowska et al. 2020; Granda et al., Sec. 5.3).

* :func:`lrp` - layer-wise relevance propagation with composites (``"preset_a_flat"``,
  ``"epsilon_plus_flat"``, ``"epsilon"``, ``"zero"``), rules as small classes
  (:mod:`robustops.xai.rules`) on one hook mechanism (:mod:`robustops.xai.core`), undoable
  canonizers (:mod:`robustops.xai.canonizers`); :func:`relevance_sums` for per-layer totals.
* :func:`gradcam` - Grad-CAM with per-neuron (channel) selection.
* :func:`explain_pair` - clean / adversarial / difference maps with aligned targets.
* :func:`lrp_signatures` + :func:`project` - the global view (UMAP of LRP signatures).
* :func:`plot_heatmaps`, :func:`plot_embedding` - matplotlib figures.
* :func:`adversarial_retrain` - extend the training set with successful adversarial examples and
  fine-tune a copy of the model (paper Sec. 4.1, Table 1).

Details: ``docs/xai.md``.
"""
from . import canonizers, composites, rules
from .canonizers import CompactAsLinear, MergeBatchNorm, ResidualSum, Sum, default_canonizers
from .composites import COMPOSITES, Composite, get_composite, register_rule, unregister_rule
from .core import lrp, lrp_signatures, relevance_sums
from .pair import ExplanationPair, explain_pair
from .embedding import project
from .errors import LayerNotFoundError, MissingExtraError, SharedModuleError, UnsupportedLayerError
from .gradcam import gradcam
from .plots import plot_embedding, plot_heatmaps
from .retrain import RetrainReport, adversarial_retrain

__all__ = [
    "lrp", "relevance_sums", "gradcam", "explain_pair", "ExplanationPair", "lrp_signatures", "project",
    "plot_heatmaps", "plot_embedding", "adversarial_retrain", "RetrainReport",
    "Composite", "get_composite", "register_rule", "unregister_rule", "COMPOSITES",
    "MergeBatchNorm", "ResidualSum", "CompactAsLinear", "Sum", "default_canonizers",
    "UnsupportedLayerError", "SharedModuleError", "LayerNotFoundError", "MissingExtraError",
    "rules", "composites", "canonizers",
]
