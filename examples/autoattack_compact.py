"""Compact convolution under a reliable attack: clean / FGSM / PGD-20 / AutoAttack accuracy.

    python examples/autoattack_compact.py [--variants SM,CCN,CCN+LS] [--train 10000] [--epochs 3]
        [--test 200] [--eps 0.1,0.2] [--version standard] [--data /usr/share/datasets/fashion-mnist]
        [--json out.json]

Trains SM, CCN and CCN+LS (robustops.nn.build_variant, the seed paper's MNIST architecture) exactly
as examples/compact_fashion_mnist.py does (class-balanced Fashion-MNIST subset, Adam one-cycle,
seed 0), then evaluates the first ``--test`` test images at each eps (Linf, pixels in [0, 1]):

* FGSM: one signed-gradient step (the only white-box attack of Ranjan et al. 2017's Table 1);
* PGD-20: 20 steps of size eps/8 from a random start (robustops.attacks.PGD);
* AutoAttack ``--version`` (default standard: APGD-CE, APGD-T, FAB-T, Square), with its
  integrity flags.

Prints a markdown table (accuracy in %, run time of each evaluation in seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compact_fashion_mnist import DEFAULT_DATA, balanced_subset, load_fashion_mnist, train  # noqa: E402

from robustops.attacks import PGD, AutoAttack, fgsm  # noqa: E402
from robustops.nn import build_variant  # noqa: E402


def accuracy(model, x, y, batch=500):
    with torch.no_grad():
        return sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch)) / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="SM,CCN,CCN+LS")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--eps", default="0.1,0.2")
    ap.add_argument("--version", default="standard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    eps_list = [float(e) for e in args.eps.split(",")]
    t0 = time.time()
    xtr, ytr, xte, yte = load_fashion_mnist(args.data)
    gen = torch.Generator().manual_seed(args.seed)
    idx = balanced_subset(ytr, args.train, gen)
    xtr, ytr = xtr[idx].contiguous(), ytr[idx].contiguous()
    xte, yte = xte[:args.test].contiguous(), yte[:args.test].contiguous()
    print(f"Fashion-MNIST: {len(xtr)} train, {len(xte)} test; {args.epochs} epochs; eps {eps_list}; "
          f"AutoAttack {args.version}; {torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        t1 = time.time()
        torch.manual_seed(args.seed)
        variant = build_variant(name)
        model = train(variant, xtr, ytr, args.epochs, args.batch, args.lr, args.seed, lambda s: print(s, flush=True))
        model.eval()
        row = {"model": variant.name, "train_s": time.time() - t1, "clean": accuracy(model, xte, yte), "eps": {}}
        for eps in eps_list:
            r = {}
            t = time.time()
            r["fgsm"] = accuracy(model, fgsm(model, xte, yte, eps=eps), yte)
            r["fgsm_s"] = time.time() - t
            t = time.time()
            r["pgd20"] = accuracy(model, PGD(model, eps=eps, alpha=eps / 8, steps=20, random_start=True, seed=0)(xte, yte), yte)
            r["pgd20_s"] = time.time() - t
            aa = AutoAttack(model, norm="Linf", eps=eps, version=args.version, seed=args.seed, warn=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                aa(xte, yte)
            res = aa.last_result
            r["autoattack"] = res.robust_accuracy
            r["autoattack_s"] = res.time["total"]
            r["after"] = res.accuracy_after
            r["flags"] = res.flag_names
            row["eps"][eps] = r
            print(f"  {variant.name:7s} eps={eps}: clean {100 * row['clean']:.1f}%  FGSM {100 * r['fgsm']:.1f}%  "
                  f"PGD-20 {100 * r['pgd20']:.1f}%  AutoAttack {100 * r['autoattack']:.1f}% "
                  f"({r['autoattack_s']:.0f} s; after each: "
                  + ", ".join(f"{k} {100 * v:.1f}" for k, v in r["after"].items())
                  + f"; flags {r['flags']})", flush=True)
        rows.append(row)
    print()
    head = "| Method | clean | " + " | ".join(f"FGSM {e} | PGD-20 {e} | AutoAttack {e}" for e in eps_list) + " |"
    print(head)
    print("|---" * (2 + 3 * len(eps_list)) + "|")
    for row in rows:
        cells = [f"{100 * row['clean']:.1f}"]
        for e in eps_list:
            r = row["eps"][e]
            cells += [f"{100 * r['fgsm']:.1f}", f"{100 * r['pgd20']:.1f}",
                      f"**{100 * r['autoattack']:.1f}** ({r['autoattack_s']:.0f} s)"]
        print(f"| {row['model']} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
