"""Klawikowska et al. 2020, Table 1, in reduced form on Fashion-MNIST (CPU, a few minutes).

    python examples/xai_retrain_fashion_mnist.py [--figures DIR] [--quick]

1. Train a small CNN (``robustops.models.small_cnn(input_size=28)``) on a balanced subset of the
   Fashion-MNIST training set.
2. Test sets as in the paper: ``clear_test`` (clean test images), ``clear+fgsm_test`` (clean test
   images plus the FGSM examples that fool the clean model), ``clear+OP_test`` (plus the
   successful one-pixel examples, on a test subset: one-pixel runs differential evolution per
   image).
3. ``adversarial_retrain``: the FGSM-immune model (training set + its successful FGSM examples)
   and the one-pixel-immune model (training set + successful one-pixel examples of a training
   subset), each fine-tuned from the clean weights; evaluated on the extended test set of their
   attack, generated against the clean model ("the previously generated, extended testing set").
4. ``--figures DIR``: LRP (preset A flat) heatmaps of clean / FGSM / one-pixel inputs for the clean
   and the immune models, and the UMAP of LRP signatures (paper Figs. 3-6).

Needs the Fashion-MNIST IDX files (``apt-get install dataset-fashion-mnist`` or ROBUSTOPS_DATA).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from robustops import data, models, xai  # noqa: E402
from robustops.attacks import FGSM, OnePixel  # noqa: E402
from robustops.xai.retrain import adversarial_examples, predict  # noqa: E402


def balanced(x, y, n, seed):
    g = torch.Generator().manual_seed(seed)
    per = n // 10
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per]]
                     for c in range(10)])
    idx = idx[torch.randperm(idx.numel(), generator=g)]
    return x[idx].contiguous(), y[idx].contiguous()


def accuracy(model, x, y):
    return 100.0 * float((predict(model, x) == y).float().mean())


def extended(model, x, y, attack, batch):
    """Clean test set plus the successful adversarial examples of ``attack`` against ``model``."""
    x_adv, ok = adversarial_examples(model, x, y, attack, batch)
    return torch.cat([x, x_adv[ok]]), torch.cat([y, y[ok]]), x_adv, ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--op-train", type=int, default=800, help="training images attacked by one-pixel")
    p.add_argument("--op-test", type=int, default=400, help="test images attacked by one-pixel")
    p.add_argument("--op-steps", type=int, default=10)
    p.add_argument("--op-popsize", type=int, default=60)
    p.add_argument("--eps", type=float, default=0.1, help="FGSM L-inf budget in [0, 1] pixel units")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--retrain-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figures", metavar="DIR", help="save LRP heatmaps and the UMAP figure here")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    a = p.parse_args(argv)
    if a.quick:
        a.train_size, a.test_size, a.op_train, a.op_test, a.epochs, a.op_steps = 2000, 400, 100, 60, 1, 5
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    x_tr, y_tr = balanced(*data.as_tensors(data.load("fashion-mnist", split="train")), a.train_size, a.seed)
    x_te, y_te = balanced(*data.as_tensors(data.load("fashion-mnist", split="test")), a.test_size, a.seed + 1)
    torch.manual_seed(a.seed)
    model = models.small_cnn(input_size=28)
    models.train(model, (x_tr, y_tr), epochs=a.epochs, optimizer="adam", lr=2e-3, batch_size=64, seed=a.seed)
    model.eval()
    t_train = time.perf_counter() - t_start

    fgsm = FGSM(model, eps=a.eps)
    op = OnePixel(model, pixels=1, steps=a.op_steps, popsize=a.op_popsize, seed=a.seed)
    x_f, y_f, x_te_fgsm, ok_f = extended(model, x_te, y_te, fgsm, 500)
    x_o, y_o, x_te_op, ok_o = extended(model, x_te[:a.op_test], y_te[:a.op_test], op, a.op_test)
    t_attack = time.perf_counter() - t_start - t_train

    fgsm_immune, rep_f = xai.adversarial_retrain(model, (x_tr, y_tr), fgsm, epochs=a.retrain_epochs, seed=a.seed,
                                                 optimizer="adam", lr=5e-4, batch_size=64, attack_batch_size=500)
    # one-pixel attacks only the first op_train training images (differential evolution per image);
    # the whole training set plus the successful ones is used for fine-tuning
    op_immune, rep_o = xai.adversarial_retrain(model, (x_tr, y_tr), op, epochs=a.retrain_epochs, seed=a.seed,
                                               optimizer="adam", lr=5e-4, batch_size=64,
                                               attack_batch_size=a.op_train, attack_limit=a.op_train)
    # control: the same fine-tuning on clean data only (separates "more training" from "adversarial data")
    import copy
    control = copy.deepcopy(model)
    models.train(control, (x_tr, y_tr), epochs=a.retrain_epochs, optimizer="adam", lr=5e-4, batch_size=64,
                 seed=a.seed)
    control.eval()
    t_all = time.perf_counter() - t_start

    rows = [
        ("Clear", "clear_test", accuracy(model, x_te, y_te), x_te.shape[0]),
        ("Clear", "clear+fgsm_test", accuracy(model, x_f, y_f), x_f.shape[0]),
        ("Clear", "clear+OP_test", accuracy(model, x_o, y_o), x_o.shape[0]),
        ("FGSM immune", "clear+fgsm_test", accuracy(fgsm_immune, x_f, y_f), x_f.shape[0]),
        ("One-pixel immune", "clear+OP_test", accuracy(op_immune, x_o, y_o), x_o.shape[0]),
        ("FGSM immune", "clear_test", accuracy(fgsm_immune, x_te, y_te), x_te.shape[0]),
        ("Clear + clean fine-tuning (control)", "clear+fgsm_test", accuracy(control, x_f, y_f), x_f.shape[0]),
        ("Clear + clean fine-tuning (control)", "clear+OP_test", accuracy(control, x_o, y_o), x_o.shape[0]),
        ("Clear + clean fine-tuning (control)", "clear_test", accuracy(control, x_te, y_te), x_te.shape[0]),
        ("One-pixel immune", "clear_test", accuracy(op_immune, x_te, y_te), x_te.shape[0]),
    ]
    print(f"\nFashion-MNIST, small_cnn(input_size=28), {a.train_size} training / {a.test_size} test images, "
          f"FGSM eps={a.eps}, one-pixel: {a.op_steps} DE generations x {a.op_popsize} candidates")
    print(f"clean model: {a.epochs} epochs Adam lr 2e-3; retraining: FGSM {a.retrain_epochs} epochs, "
          f"one-pixel {a.retrain_epochs} epochs, Adam lr 5e-4, seed {a.seed}")
    print(f"FGSM on the test set: {int(ok_f.sum())} successful of {x_te.shape[0]}; "
          f"one-pixel: {int(ok_o.sum())} of {a.op_test}")
    print(f"retraining sets: FGSM +{rep_f.n_adversarial} (success {100 * rep_f.attack_success_rate:.1f}% of "
          f"{rep_f.n_correct} correct), one-pixel +{rep_o.n_adversarial} of {rep_o.n_attacked} attacked "
          f"(success {100 * rep_o.attack_success_rate:.1f}%)")
    print("\n| Model | test set | accuracy [%] | images |\n|---|---|---|---|")
    for m, s, acc, n in rows:
        print(f"| {m} | {s} | {acc:.2f} | {n} |")
    print(f"\ntimes: train {t_train:.0f} s, test-set attacks {t_attack:.0f} s, retraining "
          f"{rep_f.seconds['attack'] + rep_f.seconds['train']:.0f} + {rep_o.seconds['attack'] + rep_o.seconds['train']:.0f} s, "
          f"total {t_all:.0f} s (1 thread)")

    if a.figures:
        import matplotlib
        matplotlib.use("Agg")
        os.makedirs(a.figures, exist_ok=True)
        sel_f = torch.nonzero(ok_f).flatten()[:6]
        pair = xai.explain_pair(model, x_te[sel_f], x_te_fgsm[sel_f], target="own")
        xai.plot_heatmaps(pair, images=(x_te[sel_f], x_te_fgsm[sel_f])).savefig(os.path.join(a.figures, "lrp_fgsm.png"), dpi=120)
        sel_o = torch.nonzero(ok_o).flatten()[:6]
        if sel_o.numel():
            pair = xai.explain_pair(model, x_te[sel_o], x_te_op[sel_o], target="own")
            xai.plot_heatmaps(pair, images=(x_te[sel_o], x_te_op[sel_o])).savefig(os.path.join(a.figures, "lrp_onepixel.png"), dpi=120)
            pair = xai.explain_pair(op_immune, x_te[sel_o], x_te_op[sel_o], target="own")
            xai.plot_heatmaps(pair, images=(x_te[sel_o], x_te_op[sel_o])).savefig(os.path.join(a.figures, "lrp_onepixel_immune.png"), dpi=120)
        n = min(500, x_te.shape[0])
        both = torch.cat([x_te[:n], x_te_fgsm[:n]])
        sig = xai.lrp_signatures(model, both)
        emb = xai.project(sig, method="umap", seed=a.seed)
        labels = torch.cat([y_te[:n], y_te[:n]])
        success = torch.cat([torch.zeros(n, dtype=torch.bool), ok_f[:n]])
        adv = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
        xai.plot_embedding(emb, labels, success, adv, class_names=data.FASHION_MNIST_CLASSES
                           if hasattr(data, "FASHION_MNIST_CLASSES") else None,
                           title="UMAP of LRP signatures (fc2 input), clean and FGSM").savefig(
            os.path.join(a.figures, "umap_fgsm.png"), dpi=120)
        print(f"figures written to {a.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
