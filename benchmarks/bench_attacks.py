"""Attacks: the FGSM accuracy curve from one gradient vs per-eps loops; DeepFool batched vs per image.

* ``robust_accuracy_curve`` vs a torchattacks-style loop (per eps: forward+backward for the
  input gradient, the step, a forward) on Papernot's MNIST net (``papernot_mnist``, seed 4) with a
  512-image batch (digits upsampled to 28x28) and K = 10; also vs ``torchattacks.FGSM`` looped
  over eps when torchattacks is installed. The floor of the curve is 1 forward+backward + K
  forwards against K x (forward+backward+forward) for the loops.
* DeepFool batched over the batch vs the same attack called image by image (small CNN, digits).
* PGD (issue 9 item 12) vs ``torchattacks.PGD`` (when installed) and vs the same algorithm as a
  plain eager loop: ``small_cnn`` at 28x28, 256 digits, eps 0.1, alpha 0.01, 20 steps, random
  start, one thread, same process, timed interleaved. Outputs are compared bit for bit (same
  global seed before each call). Two robustops records: the default (the batch attacked in
  chunks, ``batch_size=None``) and ``batch_size=256`` (one chunk: the per-step overhead alone).
  The records also carry the best (minimum) times, per the honest-figures rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import robustops  # noqa: F401
from robustops import data, models
from robustops.attacks import DeepFool, robust_accuracy_curve

from _timing import interleaved as _interleaved  # noqa: E402


def _record(shape, impl, ref_name, med, ref):
    return {"name": "robust_accuracy_curve", "shape": shape, "impl": impl, "reference": ref_name,
            "median_s": med, "reference_median_s": ref, "ratio": med / ref, "speedup": ref / med,
            "device": "cpu", "threads": torch.get_num_threads()}


def _curve_records(quick: bool) -> list:
    records = []
    x, y = data.as_tensors(data.load("digits", split="train", size=28))
    x, y = x[:512].contiguous(), y[:512].contiguous()
    torch.manual_seed(4)
    model = models.papernot_mnist().eval()
    K = 10
    eps = [0.3 * k / (K - 1) for k in range(K)]
    shape = f"cpu:papernot_mnist 512x1x28x28 K={K}"
    reps = 3 if quick else 5

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

    def curve():  # default: K forwards of the 512-image FGSM batch (exactly fgsm's forwards)
        return robust_accuracy_curve(model, (x, y), eps, batch_size=512)

    def curve_concat():  # option: concatenated forwards of 2048 images
        return robust_accuracy_curve(model, (x, y), eps, batch_size=512, concat_forward=True)

    def fwd():
        with torch.inference_mode():
            return model(x)

    def fwd_bwd():
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)

    fns = {"loop": loop, "curve": curve, "concat": curve_concat, "fwd": fwd, "fwd_bwd": fwd_bwd}
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

        fns["torchattacks"] = ta_loop
    t = _interleaved(fns, reps)
    ref_name = "per-eps loop (fwd+bwd, step, fwd)"
    records = [
        _record(shape, "robust_accuracy_curve", ref_name, t["curve"], t["loop"]),
        _record(shape, "curve concat_forward=True", ref_name, t["concat"], t["loop"]),
    ]
    if "torchattacks" in t:
        records.append(_record(shape, "robust_accuracy_curve", "torchattacks.FGSM looped over eps (+ fwd)",
                               t["curve"], t["torchattacks"]))
    ideal = K * (t["fwd_bwd"] + t["fwd"]) / (t["fwd_bwd"] + K * t["fwd"])
    records.append(_record(shape, "model forward (inference)",
                           f"forward+input-backward; floor-vs-loop ideal speedup {ideal:.2f}x", t["fwd"], t["fwd_bwd"]))
    return records


def _deepfool_records(quick: bool) -> list:
    x_tr, y_tr = data.as_tensors(data.load("digits", split="train"))
    x, y = data.as_tensors(data.load("digits", split="test"))
    n = 64 if quick else 128
    x, y = x[:n], y[:n]
    torch.manual_seed(0)
    model = models.small_cnn()
    models.train(model, (x_tr, y_tr), epochs=3, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    atk = DeepFool(model, steps=50)

    def batched():
        return atk(x, y)

    def per_image():
        return [atk(x[i:i + 1], y[i:i + 1]) for i in range(n)]

    t = _interleaved({"batched": batched, "per_image": per_image}, 1 if quick else 3)
    rec = _record(f"cpu:small_cnn digits {n}x1x8x8", "DeepFool batched", "DeepFool image by image",
                  t["batched"], t["per_image"])
    rec["name"] = "deepfool"
    return [rec]


def _pgd_records(quick: bool) -> list:
    from robustops.attacks import PGD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = data.as_tensors(data.load("digits", split="test", size=28))
        x, y = x[:256].contiguous(), y[:256].contiguous()
        torch.manual_seed(0)
        model = models.small_cnn(input_size=28).eval()
        eps, alpha, steps = 0.1, 0.01, 20

        def eager():  # torchattacks' PGD algorithm, written out (mean cross-entropy, as theirs)
            torch.manual_seed(1)
            adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1).detach()
            for _ in range(steps):
                adv.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
                adv = adv.detach() + alpha * g.sign()
                adv = torch.clamp(x + torch.clamp(adv - x, -eps, eps), 0, 1).detach()
            return adv

        ours_auto = PGD(model, eps, alpha, steps)
        ours_one = PGD(model, eps, alpha, steps, batch_size=256)

        def auto():
            torch.manual_seed(1)
            return ours_auto(x, y)

        def one():
            torch.manual_seed(1)
            return ours_one(x, y)

        fns = {"auto": auto, "one": one, "eager": eager}
        try:
            import torchattacks

            ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)

            def theirs():
                torch.manual_seed(1)
                return ta(x, y)

            fns["torchattacks"] = theirs
        except ImportError:
            pass
        outs = {k: f() for k, f in fns.items()}
        med, best = _interleaved(fns, 3 if quick else 7, best=True)
        shape = "cpu:small_cnn 256x1x28x28 eps=0.1 20 steps 1 thread"
        records = []
        for ref in [r for r in ("torchattacks", "eager") if r in fns]:
            ref_name = "torchattacks.PGD" if ref == "torchattacks" else "eager PGD loop (torchattacks' algorithm)"
            for impl, label in (("auto", "PGD (default: batch chunks)"), ("one", "PGD batch_size=256")):
                rec = _record(shape, label, ref_name, med[impl], med[ref])
                rec.update(name="pgd", best_s=best[impl], reference_best_s=best[ref],
                           best_speedup=best[ref] / best[impl], bit_identical=bool(torch.equal(outs[impl], outs[ref])),
                           threads=1)
                records.append(rec)
        return records
    finally:
        torch.set_num_threads(threads)


def run(quick: bool = False) -> list:
    return _curve_records(quick) + _deepfool_records(quick) + _pgd_records(quick)


if __name__ == "__main__":
    for r in run():
        print(r)
