"""Reduced reproduction of Ranjan et al. 2017, Table 1 (FGSM), on Fashion-MNIST, CPU only.

    python examples/compact_fashion_mnist.py [--variants SM,L2SM,CCN,CCN+LS] [--train 12000]
        [--epochs 3] [--test 2000] [--data /usr/share/datasets/fashion-mnist] [--json out.json]

Trains each variant (robustops.nn.build_variant: the paper's Papernot MNIST architecture, Table 10)
on a class-balanced subset of the Fashion-MNIST training set, then attacks the first ``--test``
test images with FGSM, x_adv = clamp(x + eps * sign(grad_x sum CE(model(x), y)), 0, 1), for
eps in {0, 0.1, 0.2, 0.3} (robustops.ops.fgsm_step makes every eps from one gradient) and prints a
markdown table of accuracy (%). Data: the Debian package ``dataset-fashion-mnist`` (real IDX files,
gzip or not); no download.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from robustops.nn import VARIANTS, build_variant  # noqa: E402
from robustops.ops import fgsm_step  # noqa: E402

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
EPS = (0.0, 0.1, 0.2, 0.3)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): magic 0x0000 TT DD, big-endian dims, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX type code 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, got {data.size}")
    return data.reshape(dims)


def _find(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        p = os.path.join(data_dir, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {data_dir}; install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass --data"
    )


def load_fashion_mnist(data_dir: str):
    xs, ys = [], []
    for split in ("train", "t10k"):
        x = read_idx(_find(data_dir, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find(data_dir, f"{split}-labels-idx1-ubyte"))
        xs.append(torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1))
        ys.append(torch.from_numpy(y.astype(np.int64)))
    return xs[0], ys[0], xs[1], ys[1]


def balanced_subset(y: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    classes = int(y.max()) + 1
    per = n // classes
    idx = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=gen)[:per]]
           for c in range(classes)]
    idx = torch.cat(idx)
    return idx[torch.randperm(idx.numel(), generator=gen)]


def train(variant, x, y, epochs, batch, lr, seed, log):
    torch.manual_seed(seed)
    model, criterion = variant.model, variant.criterion
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((x.shape[0] + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, x.shape[0], batch):
            b = perm[i:i + batch]
            xb, yb = x[b], y[b]
            out = model(xb)
            loss = criterion(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * b.numel()
            correct += int((out.argmax(1) == yb).sum())
            total += b.numel()
        log(f"  {variant.name:7s} epoch {ep + 1}/{epochs}: loss {loss_sum / total:.4f} train acc {100 * correct / total:.2f}%")
    model.eval()
    return model


def fgsm_accuracy(model, x, y, eps=EPS, batch=500):
    """Accuracy (%) at every eps; FGSM on the summed (true-label) cross-entropy, clamp to [0, 1]."""
    correct = torch.zeros(len(eps))
    steps = [e for e in eps if e > 0]
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].clone().requires_grad_(True)
        yb = y[i:i + batch]
        out = model(xb)
        loss = torch.nn.functional.cross_entropy(out, yb, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)
        with torch.no_grad():
            k = 0
            advs = fgsm_step(xb.detach(), grad, steps, 0.0, 1.0) if steps else None
            for j, e in enumerate(eps):
                if e == 0:
                    pred = out.argmax(1)
                else:
                    pred = model(advs[k]).argmax(1)
                    k += 1
                correct[j] += int((pred == yb).sum())
    return (100.0 * correct / x.shape[0]).tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="SM,L2SM,CCN,CCN+LS")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--train", type=int, default=10000, help="training images (class balanced)")
    ap.add_argument("--test", type=int, default=2000, help="test images attacked")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        if n.lower() not in {v.lower() for v in VARIANTS}:
            ap.error(f"unknown variant {n!r}; choose from {', '.join(VARIANTS)}")

    t0 = time.time()
    xtr, ytr, xte, yte = load_fashion_mnist(args.data)
    gen = torch.Generator().manual_seed(args.seed)
    idx = balanced_subset(ytr, args.train, gen)
    xtr, ytr = xtr[idx].contiguous(), ytr[idx].contiguous()
    xte, yte = xte[: args.test].contiguous(), yte[: args.test].contiguous()
    print(f"Fashion-MNIST: {xtr.shape[0]} training images, {xte.shape[0]} test images; "
          f"{args.epochs} epochs, batch {args.batch}, Adam, one-cycle lr max {args.lr}, "
          f"seed {args.seed}, {torch.get_num_threads()} threads", flush=True)

    results = {}
    for name in names:
        t1 = time.time()
        torch.manual_seed(args.seed)
        variant = build_variant(name)
        model = train(variant, xtr, ytr, args.epochs, args.batch, args.lr, args.seed,
                      lambda s: print(s, flush=True))
        acc = fgsm_accuracy(model, xte, yte)
        alphas = {n: round(float(b.detach()), 3) for n, b in model.named_parameters() if n.endswith("alpha")}
        alphas.update({n: round(float(b), 3) for n, b in model.named_buffers() if n.endswith("alpha")})
        results[variant.name] = {"accuracy": acc, "seconds": time.time() - t1, "alpha": alphas}
        if alphas:
            print(f"  {variant.name:7s} alpha after training: {alphas}", flush=True)
        print(f"  {variant.name:7s} FGSM acc " + " ".join(f"eps={e}: {a:.2f}%" for e, a in zip(EPS, acc))
              + f"  ({time.time() - t1:.0f} s)", flush=True)

    print()
    print("| Method | " + " | ".join(f"eps={e}" for e in EPS) + " |")
    print("|---|" + "---|" * len(EPS))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in r["accuracy"]) + " |")
    print(f"\ntotal {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "eps": EPS, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
