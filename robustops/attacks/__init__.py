"""Adversarial attacks (torchattacks-style calling convention) and robustness metrics.

Every attack is a class taking the model and its hyper-parameters, called as ``atk(x, y)``,
plus a functional form ``attack(model, x, y, ...)``. Inputs are in ``[lo, hi]`` (default [0, 1]);
``y=None`` means the model's predictions; targeted attacks take target labels. The model is run in
eval mode and restored exactly afterwards (train flags, ``requires_grad``, ``.grad``).

=========================  ============================================  =========================
class / function           attack                                        returns
=========================  ============================================  =========================
FGSM / fgsm                Goodfellow et al. 2015 (fused fgsm_step)      x_adv
robust_accuracy_curve      FGSM accuracy for K eps, one gradient          Tensor[K]
BIM, PGD, PGDL2 / bim ...  Kurakin 2017, Madry 2018 (Linf, L2)            x_adv
DeepFool / deepfool        Moosavi-Dezfooli 2016 + max-residue ratio d    DeepFoolResult (rho_adv)
CWL2 / cw_l2               Carlini & Wagner 2017 (L2)                     x_adv (.last_result)
JSMA / jsma                Papernot et al. 2016 (targeted, pairs)         x_adv (.last_result)
OnePixel / one_pixel       Su et al. 2019 (differential evolution)        x_adv (.last_result)
substitute_attack          Papernot et al. 2017 black-box                 SubstituteResult
APGD, APGDT                Croce & Hein 2020 (Auto-PGD, CE/DLR, targeted) x_adv (.last_success)
FAB                        Croce & Hein 2020 (FAB / FAB-T)                x_adv (.last_distance)
Square                     Andriushchenko et al. 2020 (score-based)       x_adv (.last_success)
AutoAttack                 Croce & Hein 2020 (the four above, flags)      x_adv (.last_result)
=========================  ============================================  =========================
"""
from .base import Attack
from .curve import robust_accuracy_curve
from .cw import CWL2, CWResult, cw_l2
from .deepfool import DeepFool, DeepFoolResult, deepfool
from .fgsm import FGSM, fgsm
from .gradients import input_gradient
from .jsma import JSMA, JSMAResult, jsma
from .onepixel import OnePixel, OnePixelResult, one_pixel
from .pgd import BIM, PGD, PGDL2, bim, pgd, pgd_l2
from .substitute import SubstituteResult, oracle_labels, substitute_attack

__all__ = [
    "Attack", "input_gradient",
    "FGSM", "fgsm", "robust_accuracy_curve",
    "BIM", "PGD", "PGDL2", "bim", "pgd", "pgd_l2",
    "DeepFool", "DeepFoolResult", "deepfool",
    "CWL2", "CWResult", "cw_l2",
    "JSMA", "JSMAResult", "jsma",
    "OnePixel", "OnePixelResult", "one_pixel",
    "SubstituteResult", "substitute_attack", "oracle_labels",
]

# ---- AutoAttack (issue #15) ----
from .apgd import APGD, APGDT  # noqa: E402
from .autoattack import AutoAttack, AutoAttackFlag, AutoAttackResult, AutoAttackWarning  # noqa: E402
from .fab import FAB  # noqa: E402
from .square import Square  # noqa: E402

__all__ += ["APGD", "APGDT", "FAB", "Square", "AutoAttack", "AutoAttackResult", "AutoAttackFlag",
            "AutoAttackWarning"]
