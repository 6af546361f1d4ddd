"""The ``robustops`` command line.

    robustops demo [--epochs N] [--seed S] [--eps 0 0.05 ...] [--json PATH]
    robustops info

``demo`` is the main job behind ``make demo``: train a small CNN on scikit-learn's embedded
digits (real data, nothing downloaded) and print its clean accuracy and its accuracy under FGSM
at several epsilons, the whole curve computed from one input gradient with the fused
``fgsm_step`` op.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import torch


def demo(epochs: int = 15, seed: int = 0, eps: Optional[Sequence[float]] = None, json_path: Optional[str] = None) -> dict:
    import robustops
    from robustops import data, models
    from robustops.attacks import robust_accuracy_curve

    eps = list(eps) if eps is not None else [0.0, 0.05, 0.1, 0.2, 0.3]
    print(f"robustops {robustops.__version__} | build: {robustops.build_info()}")
    train_set = data.load("digits", split="train")
    test_set = data.load("digits", split="test")
    x_train, y_train = data.as_tensors(train_set)
    x_test, y_test = data.as_tensors(test_set)
    print(f"data: sklearn digits, {len(train_set)} train / {len(test_set)} test images, shape {tuple(x_train.shape[1:])}")

    torch.manual_seed(seed)
    model = models.small_cnn(in_channels=1, num_classes=10, input_size=8)
    t0 = time.perf_counter()
    models.train(model, (x_train, y_train), epochs=epochs, optimizer="adam", lr=3e-3, batch_size=32, seed=seed)
    train_s = time.perf_counter() - t0
    clean_acc, _ = models.evaluate(model, (x_test, y_test))
    print(f"model: small_cnn, {sum(p.numel() for p in model.parameters())} parameters, trained {epochs} epochs in {train_s:.1f} s")
    print(f"clean test accuracy: {clean_acc:.4f}")

    t0 = time.perf_counter()
    curve = robust_accuracy_curve(model, (x_test, y_test), eps).tolist()
    curve_s = time.perf_counter() - t0
    print(f"FGSM accuracy vs eps (one gradient, fused fgsm_step, {curve_s * 1e3:.0f} ms):")
    print("   eps   accuracy")
    for e, a in zip(eps, curve):
        print(f"  {e:5.3f}   {a:.4f}")
    result = {"clean_accuracy": clean_acc, "eps": eps, "fgsm_accuracy": curve, "epochs": epochs, "seed": seed}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {json_path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="robustops", description="robustops command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a small CNN on digits; clean and FGSM accuracy")
    p_demo.add_argument("--epochs", type=int, default=15)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--eps", type=float, nargs="+", default=None)
    p_demo.add_argument("--json", dest="json_path", default=None, help="write the results here")
    sub.add_parser("info", help="print how the compiled core was built")
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.epochs < 1:
            parser.error("--epochs must be >= 1")
        if args.eps is not None and any(e < 0 for e in args.eps):
            parser.error("--eps values must be >= 0")
        demo(epochs=args.epochs, seed=args.seed, eps=args.eps, json_path=args.json_path)
    elif args.command == "info":
        import robustops

        print(json.dumps(robustops.build_info(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
