"""Batched exact kernel dropout (robustops.fragile.kernel_dropout) vs the naive loop.

The naive reference is the paper's procedure: for each kernel c, deep-copy the model, zero
kernel c (weights and bias), evaluate in batches of 256. Also timed: the generic masked path
(pure PyTorch, no compiled consumer op) and the first-order Taylor screen (one forward+backward),
whose Spearman correlation with the exact accuracy drop is reported in the impl column.

Models: Papernot's MNIST net (conv1: 32 kernels) on 1,000 28x28 images, briefly trained on
Fashion-MNIST when the data is installed (random weights otherwise; speed does not depend on
it); ResNet-18 with the MNIST stem (conv1: 64 kernels, width 1) on fewer images (16, quick: 8)
because the naive loop costs 64 full ResNet-18 evaluations.
"""
from __future__ import annotations

import torch

try:
    from .common import compare, median_seconds
except ImportError:  # run as a script
    from common import compare, median_seconds

import robustops  # noqa: F401
from robustops.fragile import kernel_dropout, kernel_dropout_naive, taylor_importance
from robustops.fragile._common import spearman
from robustops.models import papernot_mnist, resnet18, train


def _data(n: int, size: int = 28, train_n: int = 0):
    try:
        from robustops import data

        x, y = data.as_tensors(data.load("fashion-mnist", split="test", limit=n))
        xt = yt = None
        if train_n:
            xt, yt = data.as_tensors(data.load("fashion-mnist", split="train", limit=train_n))
        return x, y, xt, yt, "fashion-mnist"
    except Exception:  # noqa: BLE001 - no data installed: random images
        g = torch.Generator().manual_seed(0)
        return (torch.rand(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g), None, None,
                "random")


def run(quick: bool = False) -> list:
    records = []
    t = 0.2 if quick else 1.0
    n = 1000
    x, y, xt, yt, source = _data(n, train_n=1000 if quick else 3000)
    torch.manual_seed(0)
    model = papernot_mnist().eval()
    if xt is not None:
        train(model, (xt, yt), epochs=1, seed=0, batch_size=64, optimizer="adam")
        model.eval()
    shape = f"cpu:papernot conv1 C=32 N={n} ({source})"

    ref_s = median_seconds(lambda: kernel_dropout_naive(model, "conv1", (x, y), batch_size=256), t)
    records.append(compare("kernel_dropout", shape, "kernel_dropout (fused op)",
                           lambda: kernel_dropout(model, "conv1", (x, y)),
                           "naive loop (copy, zero, eval bs=256)", None, t, reference_median_s=ref_s))
    if not quick:
        records.append(compare("kernel_dropout", shape, "kernel_dropout (masked, pure torch)",
                               lambda: kernel_dropout(model, "conv1", (x, y), fused=False),
                               "naive loop (copy, zero, eval bs=256)", None, t, reference_median_s=ref_s))
    exact = kernel_dropout(model, "conv1", (x, y))
    tay = taylor_importance(model, "conv1", (x, y))
    rho = spearman(tay, exact.accuracy_drop)
    records.append(compare("kernel_dropout", shape, f"taylor screen (spearman={rho:.2f})",
                           lambda: taylor_importance(model, "conv1", (x, y)),
                           "naive loop (copy, zero, eval bs=256)", None, t, reference_median_s=ref_s))
    exact_s = median_seconds(lambda: kernel_dropout(model, "conv1", (x, y)), t)
    records.append(compare("kernel_dropout", shape, f"taylor screen (spearman={rho:.2f})",
                           lambda: taylor_importance(model, "conv1", (x, y)),
                           "batched exact kernel_dropout", None, t, reference_median_s=exact_s))

    nr = 8 if quick else 16
    torch.manual_seed(0)
    rmodel = resnet18(stem="mnist").eval()
    xr, yr = x[:nr], y[:nr]
    rshape = f"cpu:resnet18 conv1 C=64 N={nr}"
    rref = median_seconds(lambda: kernel_dropout_naive(rmodel, "conv1", (xr, yr), batch_size=256), 0.1)
    records.append(compare("kernel_dropout", rshape, "kernel_dropout (fused op)",
                           lambda: kernel_dropout(rmodel, "conv1", (xr, yr)),
                           "naive loop (copy, zero, eval bs=256)", None, 0.1, reference_median_s=rref))
    return records


if __name__ == "__main__":
    for r in run():
        print(r)
