"""Fragile kernels on Fashion-MNIST (Pravin et al. 2021): Fig. 1, Algorithm 1, and the SVD defence.

    python examples/fragile_fashion_mnist.py [--out docs/fragile] [--train 10000] [--epochs 2]
    python examples/fragile_fashion_mnist.py --dataset mnist --root DIR   # MNIST IDX files in DIR

For two briefly trained models - Papernot's MNIST net and ResNet-18 with the MNIST stem at
width 0.25 (16 first-layer kernels, for CPU speed) - this
1. runs the batched exact one-kernel dropout of conv1 on 1,000 test images (clean and a fixed
   FGSM set), splits the kernels at the mean line (Fig. 1), compares with the Taylor screen;
2. runs Algorithm 1 (share of examples whose FGSM perturbation moves S more than S') per eps;
3. applies the defence (SVD clamp of S' with eps_noise searched on 500 held-out test images,
   amplification of S) and reports clean / FGSM accuracy and Algorithm 1 before and after.
Writes PNGs and results.json under --out. Needs matplotlib for the plots (skipped otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from robustops import data  # noqa: E402
from robustops.fragile import (adversarial_targeting, apply_filter, fgsm_accuracy, fragile_split,  # noqa: E402
                               kernel_dropout)
from robustops.models import evaluate, papernot_mnist, resnet18, train  # noqa: E402

TARGET_EPS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3]
FGSM_EPS = [0.0, 0.02, 0.05, 0.1, 0.2]


def study(name, model, xtr, ytr, xte, yte, xho, yho, args, out):
    t0 = time.perf_counter()
    hist = train(model, (xtr, ytr), epochs=args.epochs, optimizer="adam", seed=0, batch_size=64)
    model.eval()
    train_s = time.perf_counter() - t0
    acc, _ = evaluate(model, (xte, yte))
    print(f"[{name}] trained {args.epochs} epochs in {train_s:.0f} s, test accuracy {acc:.4f}")

    t0 = time.perf_counter()
    res = kernel_dropout(model, "conv1", (xte, yte), adversarial=args.fgsm_eps, taylor=True, batch_size=500)
    kd_s = time.perf_counter() - t0
    split = fragile_split(res)
    print(f"[{name}] kernel dropout ({res.method}) {kd_s:.1f} s: baseline {res.baseline_accuracy:.4f}, "
          f"per-kernel min {res.clean_accuracy.min():.4f} max {res.clean_accuracy.max():.4f}; "
          f"|S|={split.fragile.numel()} |S'|={split.null.numel()}; Taylor spearman {res.taylor_spearman:.2f}")
    tgt = adversarial_targeting(model, "conv1", (xte, yte), TARGET_EPS, split)
    print(f"[{name}] Alg. 1 % attacking S: " + ", ".join(f"{e:g}:{p:.1f}" for e, p in
                                                         zip(TARGET_EPS, tgt.percentage.tolist())))
    rows = {}
    for mode in ("clamp", "hard"):
        new, rep = apply_filter(model, "conv1", (xte, yte), split=split, eps_noise="search", mode=mode,
                                held_out=(xho, yho), fgsm_eps=args.fgsm_eps, targeting_eps=TARGET_EPS,
                                clean_margin=0.01)
        curve_before = fgsm_accuracy(model, xte, yte, FGSM_EPS)
        curve_after = fgsm_accuracy(new, xte, yte, FGSM_EPS)
        curve_transfer = fgsm_accuracy(new, xte, yte, FGSM_EPS, source=model)
        rows[mode] = {
            "eps_noise": rep.eps_noise, "tau": rep.tau, "alpha": rep.alpha, "beta": rep.beta,
            "search_constraint_met": rep.search.constraint_met,
            "search_table": rep.search.table,
            "clean_before": rep.clean_accuracy_before, "clean_after": rep.clean_accuracy_after,
            "fgsm_before": rep.adversarial_accuracy_before, "fgsm_after": rep.adversarial_accuracy_after,
            "fgsm_after_transfer": rep.adversarial_accuracy_after_transfer,
            "fgsm_curve_eps": FGSM_EPS, "fgsm_curve_before": curve_before.tolist(),
            "fgsm_curve_after": curve_after.tolist(), "fgsm_curve_after_transfer": curve_transfer.tolist(),
            "targeting_before": rep.targeting_before.percentage.tolist(),
            "targeting_after": rep.targeting_after.percentage.tolist(),
            "rank_kept": rep.svd.rank_kept, "sigma": rep.svd.sigma.tolist(),
        }
        print(f"[{name}] filter {mode}: eps_noise={rep.eps_noise:.4g} tau={rep.tau:.4g} alpha={rep.alpha:.3f} "
              f"clean {rep.clean_accuracy_before:.4f}->{rep.clean_accuracy_after:.4f} FGSM@{args.fgsm_eps} "
              f"{rep.adversarial_accuracy_before:.4f}->{rep.adversarial_accuracy_after:.4f} "
              f"(transfer {rep.adversarial_accuracy_after_transfer:.4f}); Alg.1 after: "
              + ", ".join(f"{p:.1f}" for p in rep.targeting_after.percentage.tolist()))
        if mode == "clamp":
            clamp_targets = (rep.targeting_before, rep.targeting_after)
    try:
        from robustops.fragile.plots import plot_kernel_performance, plot_targeting

        plot_kernel_performance(res, os.path.join(out, f"{name}_fig1.png"), split=split,
                                title=f"{name}: one-kernel dropout of conv1 ({args.dataset})")
        plot_targeting({"original": clamp_targets[0], "filtered (clamp)": clamp_targets[1]},
                       os.path.join(out, f"{name}_targeting.png"), log_eps=True,
                       title=f"{name}: Alg. 1 before/after the filter")
    except ImportError as exc:
        print(f"plots skipped: {exc}")
    return {
        "train_seconds": train_s, "train_history": hist, "test_accuracy": acc,
        "kernel_dropout_seconds": kd_s, "method": res.method,
        "baseline_accuracy": res.baseline_accuracy, "clean_accuracy": res.clean_accuracy.tolist(),
        "adversarial_accuracy": res.adversarial_accuracy.tolist(),
        "baseline_adversarial_accuracy": res.baseline_adversarial_accuracy,
        "taylor_spearman": res.taylor_spearman, "taylor_spearman_loss": res.taylor_spearman_loss,
        "fragile": split.fragile.tolist(), "null": split.null.tolist(), "mean_line": split.threshold,
        "targeting_eps": TARGET_EPS, "targeting": tgt.percentage.tolist(),
        "targeting_mean_dist_S": tgt.mean_distance_fragile.tolist(),
        "targeting_mean_dist_Sn": tgt.mean_distance_null.tolist(),
        "filter": rows,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "fragile"))
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fgsm-eps", type=float, default=0.05)
    p.add_argument("--models", nargs="+", default=["papernot", "resnet18"])
    p.add_argument("--dataset", choices=["fashion-mnist", "mnist"], default="fashion-mnist",
                   help="the verdict differs per dataset (docs/fragile_kernels.md)")
    p.add_argument("--root", default=None, help="directory of the IDX files (default: the loader's search path)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    kw = {} if args.root is None else {"root": args.root}
    xtr, ytr = data.as_tensors(data.load(args.dataset, split="train", limit=args.train, **kw))
    xall, yall = data.as_tensors(data.load(args.dataset, split="test", limit=1500, **kw))
    xte, yte = xall[:1000], yall[:1000]
    xho, yho = xall[1000:1500], yall[1000:1500]
    results = {"config": vars(args)}
    t0 = time.perf_counter()
    for name in args.models:
        torch.manual_seed(0)
        model = papernot_mnist() if name == "papernot" else resnet18(stem="mnist", width=0.25)
        results[name] = study(name, model, xtr, ytr, xte, yte, xho, yho, args, args.out)
    results["total_seconds"] = time.perf_counter() - t0
    prefix = "" if args.dataset == "fashion-mnist" else f"{args.dataset}_"
    path = os.path.join(args.out, f"results_{prefix}{'_'.join(args.models)}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"total {results['total_seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
