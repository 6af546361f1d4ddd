"""Attacks: the FGSM accuracy curve from one gradient vs per-eps loops; DeepFool batched vs per image.

* ``robust_accuracy_curve`` vs a torchattacks-style loop (per eps: forward+backward for the
  input gradient, the step, a forward) on Papernot's MNIST net (``papernot_mnist``, seed 4) with a
  512-image batch (digits upsampled to 28x28) and K = 10; also vs ``torchattacks.FGSM`` looped
  over eps when torchattacks is installed. The floor of the curve is 1 forward+backward + K
  forwards against K x (forward+backward+forward) for the loops.
* DeepFool batched over the batch vs the same attack called image by image (small CNN, digits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from .common import compare, median_seconds
except ImportError:  # run as a script
    from common import compare, median_seconds

import robustops  # noqa: F401
from robustops import data, models
from robustops.attacks import DeepFool, robust_accuracy_curve


def _curve_records(quick: bool) -> list:
    records = []
    x, y = data.as_tensors(data.load("digits", split="train", size=28))
    x, y = x[:512].contiguous(), y[:512].contiguous()
    torch.manual_seed(4)
    model = models.papernot_mnist().eval()
    K = 10
    eps = [0.3 * k / (K - 1) for k in range(K)]
    shape = f"cpu:papernot_mnist 512x1x28x28 K={K}"
    mrt = 2.0 if quick else 6.0

    def loop():
        correct = []
        for e in eps:
            xg = x.clone().requires_grad_(True)
            loss = F.cross_entropy(model(xg), y)
            (g,) = torch.autograd.grad(loss, xg)
            x_adv = torch.clamp(x + e * g.sign(), 0, 1)
            with torch.no_grad():
                correct.append((model(x_adv).argmax(1) == y).sum())
        return correct

    ref = median_seconds(loop, mrt)

    def curve():
        return robust_accuracy_curve(model, (x, y), eps, batch_size=512)

    def curve_concat():
        return robust_accuracy_curve(model, (x, y), eps, batch_size=512, concat_forward=True)

    ref_name = "per-eps loop (fwd+bwd, step, fwd)"
    records.append(compare("robust_accuracy_curve", shape, "robust_accuracy_curve", curve, ref_name, loop,
                           min_run_time=mrt, reference_median_s=ref))
    records.append(compare("robust_accuracy_curve", shape, "curve concat_forward=True", curve_concat, ref_name,
                           loop, min_run_time=mrt, reference_median_s=ref))
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    if torchattacks is not None:
        atks = [torchattacks.FGSM(model, eps=e) for e in eps]

        def ta_loop():
            out = []
            for atk in atks:
                x_adv = atk(x, y)
                with torch.no_grad():
                    out.append((model(x_adv).argmax(1) == y).sum())
            return out

        records.append(compare("robust_accuracy_curve", shape, "robust_accuracy_curve", curve,
                               "torchattacks.FGSM looped over eps", ta_loop, min_run_time=mrt))
    # the floor's components, for the note: one forward, one forward + input backward
    fwd = median_seconds(lambda: model(x), 1.0)

    def fwd_bwd():
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)

    fb = median_seconds(fwd_bwd, 1.0)
    floor_ratio = K * (fb + fwd) / (fb + K * fwd)
    records.append({"name": "robust_accuracy_curve", "shape": shape, "impl": "model forward (inference)",
                    "reference": f"forward+input-backward; ideal curve speedup {floor_ratio:.2f}x",
                    "median_s": fwd, "reference_median_s": fb, "ratio": fwd / fb, "speedup": fb / fwd,
                    "device": "cpu", "threads": torch.get_num_threads()})
    return records


def _deepfool_records(quick: bool) -> list:
    x_tr, y_tr = data.as_tensors(data.load("digits", split="train"))
    x, y = data.as_tensors(data.load("digits", split="test"))
    n = 64 if quick else 256
    x, y = x[:n], y[:n]
    torch.manual_seed(0)
    model = models.small_cnn()
    models.train(model, (x_tr, y_tr), epochs=3, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    atk = DeepFool(model, steps=50)

    def batched():
        return atk(x, y)

    def per_image():
        return [atk(x[i:i + 1], y[i:i + 1]) for i in range(n)]

    return [compare("deepfool", f"cpu:small_cnn digits {n}x1x8x8", "DeepFool batched", batched,
                    "DeepFool image by image", per_image, min_run_time=1.0 if quick else 3.0)]


def run(quick: bool = False) -> list:
    return _curve_records(quick) + _deepfool_records(quick)


if __name__ == "__main__":
    for r in run():
        print(r)
