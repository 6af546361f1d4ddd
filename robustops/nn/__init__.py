"""Robust layers (Ranjan et al. 2017): compact convolution, L2-softmax, bounded ReLU, label
smoothing, ``compactify`` and the paper's six model variants."""
from .activations import BoundedReLU
from .compact import CompactConv2d, CompactLinear
from .convert import compactify
from .l2softmax import L2SoftmaxLinear, l2softmax_alpha_lower_bound
from .losses import LabelSmoothingCrossEntropy, label_smoothing_cross_entropy, smooth_labels
from .variants import VARIANTS, Shift, Variant, build_variant, papernot_mnist

__all__ = [
    "BoundedReLU",
    "CompactConv2d",
    "CompactLinear",
    "L2SoftmaxLinear",
    "l2softmax_alpha_lower_bound",
    "LabelSmoothingCrossEntropy",
    "label_smoothing_cross_entropy",
    "smooth_labels",
    "compactify",
    "VARIANTS",
    "Variant",
    "Shift",
    "build_variant",
    "papernot_mnist",
]
