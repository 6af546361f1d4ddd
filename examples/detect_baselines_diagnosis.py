"""Why Feature Squeezing and NIC detect what they detect in ``examples/detect_experiment.py``.

    python examples/detect_baselines_diagnosis.py --datasets digits fashion-mnist
    python examples/detect_baselines_diagnosis.py --binary      # near-binary digits (MNIST's regime)

Same model, images and attacks as the experiment (its functions are reused; test split only).
Prints, per data set:

* Feature Squeezing, per squeezer: the share of clean images whose prediction it keeps, the
  95% quantile of the clean scores (its threshold alone at 5% FPR), and per attack the share of
  squeezed adversarial images that return to the true class, their median score and the TPR at
  that squeezer's own threshold;
* NIC: ROC AUC of every invariant (value per layer, provenance per adjacent pair) on clean vs
  successful adversarial test images, for the old settings (conv maps pooled to 4 x 4, softmax
  probe outputs) and the current defaults (no pooling, log-softmax probe outputs); an AUC below
  0.5 means the invariant finds adversarial images *more* typical than clean ones.

``--binary`` thresholds the digits at 0.5 before training and attacking: the regime of MNIST,
where the paper's 1-bit squeezer removes any perturbation smaller than 0.5 from a {0, 1} pixel.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import detect_experiment as X  # noqa: E402

from robustops import models  # noqa: E402
from robustops.detect import FeatureSqueezingDetector, NICDetector, evaluate_detector, squeezer_agreement  # noqa: E402
from robustops.detect.squeeze import CANDIDATE_SQUEEZERS, _squeezer  # noqa: E402


def squeeze_table(model, x_clean_fit, x_test, y_test, advs):
    agree = squeezer_agreement(model, x_clean_fit)
    with torch.no_grad():
        p = model(x_clean_fit).softmax(1)
        thr = {s: float((model(_squeezer(s)(x_clean_fit)).softmax(1) - p).abs().sum(1).quantile(0.95))
               for s in CANDIDATE_SQUEEZERS}
    print("\nFeature Squeezing per squeezer (clean: prediction kept / 95% quantile of the clean scores; "
          "per attack: squeezed adversarial -> true class / median score / TPR at that quantile)")
    print("| squeezer | clean kept | clean q95 | " + " | ".join(a.split(" ")[0] + " " + a.split(" ")[1] for a in advs) + " |")
    print("|---" * (3 + len(advs)) + "|")
    for s in CANDIDATE_SQUEEZERS:
        row = [f"{agree[s]:.3f}", f"{thr[s]:.3f}"]
        for a, (adv, ok) in advs.items():
            xa, ya = adv[ok], y_test[:adv.shape[0]][ok]
            with torch.no_grad():
                q = model(_squeezer(s)(xa)).softmax(1)
                sc = (q - model(xa).softmax(1)).abs().sum(1)
            row.append(f"{float((q.argmax(1) == ya).float().mean()):.2f} / {float(sc.median()):.3f} / "
                       f"{float((sc > thr[s]).float().mean()):.2f}")
        print(f"| {s} | " + " | ".join(row) + " |")
    fs = FeatureSqueezingDetector(model, ("bit_depth_1", "median_2x2"), fpr=0.05).fit(x_clean_fit)
    for a, (adv, ok) in advs.items():
        r = evaluate_detector(fs, x_test[:adv.shape[0]], adv[ok])
        print(f"FS bit_depth_1+median_2x2 (threshold {fs.threshold_:.3f}), {a}: accuracy {r['accuracy']:.3f} "
              f"(TPR {r['tpr']:.2f}, FPR {r['fpr']:.3f}, AUC {r['roc_auc']:.3f}, {r['n_adv']} adversarial)")


def nic_table(model, x_clean_fit, x_test, advs):
    from sklearn.metrics import roc_auc_score
    print("\nNIC: ROC AUC of each invariant (clean test vs successful adversarial test images)")
    for label, kw in (("old: pool=4, softmax probes", dict(pool=4, probe_output="softmax")),
                      ("now: no pooling, log-softmax probes", {})):
        nic = NICDetector(model, nu=0.1, fpr=0.05, seed=0, **kw).fit(x_clean_fit)
        print(f"\n{label}\n| attack | " + " | ".join(nic.invariant_names) + " |")
        print("|---" * (1 + len(nic.invariant_names)) + "|")
        for a, (adv, ok) in advs.items():
            sc = nic.invariant_scores(x_test[:adv.shape[0]]).numpy()
            sa = nic.invariant_scores(adv[ok]).numpy()
            y = np.r_[np.zeros(len(sc)), np.ones(len(sa))]
            aucs = [roc_auc_score(y, np.r_[sc[:, k], sa[:, k]]) for k in range(sc.shape[1])]
            print(f"| {a.split(' ')[0]} {a.split(' ')[1]} | " + " | ".join(f"{v:.2f}" for v in aucs) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits"])
    p.add_argument("--binary", action="store_true", help="threshold the digits at 0.5 (MNIST-like)")
    p.add_argument("--no-nic", action="store_true")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    exp = argparse.Namespace(n_train=300, n_test=200, n_cw=100, n_model_train=10000, epochs_digits=10,
                             epochs_fashion=2, eps_strong=0.3, eps_weak=0.1, cw_steps=100, cw_bss=5, cw_lr=0.1,
                             n_baseline_clean=2000, baseline_clean_from="model-train")
    for name in (["digits"] if ns.binary else ns.datasets):
        xtr, ytr, xte, yte, epochs, _, _ = X.load(name, exp)
        if ns.binary:
            xtr, xte = (xtr > 0.5).float(), (xte > 0.5).float()
        torch.manual_seed(0)
        model = models.papernot_mnist()
        models.train(model, (xtr, ytr), epochs=epochs, optimizer="adam", lr=1e-3, seed=0, batch_size=64)
        model.eval()
        gen = torch.Generator().manual_seed(1)
        X.correct_subset(model, xtr, ytr, exp.n_train, gen)          # same draws as the experiment
        xa_te, ya_te = X.correct_subset(model, xte, yte, exp.n_test, gen)
        xb_tr, _ = X.correct_subset(model, xtr, ytr, exp.n_baseline_clean, torch.Generator().manual_seed(2))
        print(f"\n## {name}{' (binarised at 0.5)' if ns.binary else ''}: clean test accuracy "
              f"{models.evaluate(model, (xte, yte))[0]:.3f}; FS/NIC fitted on {xb_tr.shape[0]} clean training images")
        advs = {}
        for aname, atk in X.attacks(exp).items():
            n = exp.n_test if not aname.startswith("CW") else min(exp.n_test, exp.n_cw)
            adv = atk(model, xa_te[:n], ya_te[:n])
            with torch.no_grad():
                advs[aname] = (adv, model(adv).argmax(1) != model(xa_te[:n]).argmax(1))
        squeeze_table(model, xb_tr, xa_te, ya_te, advs)
        if not ns.no_nic:
            nic_table(model, xb_tr, xa_te, advs)


if __name__ == "__main__":
    main()
