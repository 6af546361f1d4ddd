"""Explanations: LRP throughput vs Zennit 1.0 ``EpsilonPlusFlat``; Grad-CAM vs pytorch-grad-cam.

    python benchmarks/run.py --only xai [--quick]

* ``xai.lrp(..., composite="epsilon_plus_flat", start="one_hot")`` vs Zennit's ``Gradient``
  attributor with ``EpsilonPlusFlat`` (plus BatchNorm-merge and residual-sum canonizers for the
  ResNet, :func:`robustops.xai._peers.zennit_canonizers`) on the same model and batch: Papernot's
  MNIST net with 256 images, ResNet-18 (MNIST stem, width 1) with 64 images. Both produce the same
  heatmap (tested to 1e-4 relative in ``tests/test_xai_peers.py``). Skipped when zennit is absent.
* The same LRP vs plain gradient x input (one forward + one input backward through autograd): the
  floor any backward-pass explanation pays; always run.
* ``xai.gradcam`` vs ``pytorch_grad_cam.GradCAM`` (same layer, targets, min-max normalisation).
  Skipped when grad-cam is absent.

Timings interleave the candidates (median of rounds), so load drift hits both sides alike.
"""
from __future__ import annotations

import time

import torch

from _timing import interleaved as _interleaved  # noqa: E402
from robustops import models, xai
from robustops.xai._peers import import_gradcam, import_zennit, zennit_canonizers


def _record(name, shape, impl, ref_name, med, ref):
    return {"name": name, "shape": shape, "impl": impl, "reference": ref_name, "median_s": med,
            "reference_median_s": ref, "ratio": med / ref, "speedup": ref / med, "device": "cpu",
            "threads": torch.get_num_threads()}


def _cases(quick: bool):
    torch.manual_seed(0)
    pap = models.papernot_mnist().eval()
    res = models.resnet18(stem="mnist", width=1.0).eval()
    for m in res.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return [("papernot_mnist", pap, torch.rand(256, 1, 28, 28), "conv4"),
            ("resnet18_w1", res, torch.rand(64, 1, 28, 28), "layer4")]


def run(quick: bool = False) -> list:
    records = []
    reps = 3 if quick else 7
    zennit = import_zennit()
    pgc = import_gradcam()
    for name, model, x, cam_layer in _cases(quick):
        target = model(x).argmax(1)
        shape = f"cpu:{name} {'x'.join(map(str, x.shape))}"

        def ours():
            return xai.lrp(model, x, target, composite="epsilon_plus_flat", start="one_hot")

        def grad_x_input():
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xi)
            return g * x

        fns = {"ours": ours, "gxi": grad_x_input}
        if zennit is not None:
            from zennit.attribution import Gradient
            from zennit.composites import EpsilonPlusFlat

            out_grad = torch.zeros(x.shape[0], 10)
            out_grad[torch.arange(x.shape[0]), target] = 1

            def zennit_lrp():
                composite = EpsilonPlusFlat(canonizers=zennit_canonizers(model))
                with Gradient(model=model, composite=composite) as attributor:
                    return attributor(x, out_grad)[1]

            fns["zennit"] = zennit_lrp
        t = _interleaved(fns, reps)
        if "zennit" in t:
            records.append(_record("lrp_epsilon_plus_flat", shape, "xai.lrp", "zennit 1.0 EpsilonPlusFlat",
                                   t["ours"], t["zennit"]))
        records.append(_record("lrp_epsilon_plus_flat", shape, "xai.lrp", "gradient x input (autograd)",
                               t["ours"], t["gxi"]))

        if pgc is not None:
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            layer = dict(model.named_modules())[cam_layer]
            targets = [ClassifierOutputTarget(int(c)) for c in target]

            def theirs():
                with pgc.GradCAM(model=model, target_layers=[layer]) as cam:
                    return cam(input_tensor=x, targets=targets)

            def ours_cam():
                return xai.gradcam(model, x, cam_layer, target, normalize="minmax")

            t = _interleaved({"ours": ours_cam, "theirs": theirs}, reps)
            records.append(_record(f"gradcam_{cam_layer}", shape, "xai.gradcam", "pytorch-grad-cam 1.5 GradCAM",
                                   t["ours"], t["theirs"]))
    return records


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
