"""fused fgsm_step vs the eager stack of K clamp(x + eps*sign(g)) (issue: attacks / foundation)."""
from __future__ import annotations

import torch

try:
    from .common import compare
except ImportError:  # run as a script
    from common import compare

import robustops  # noqa: F401


def run(quick: bool = False) -> list:
    records = []
    shapes = [(256, 3, 32, 32)] if quick else [(256, 3, 32, 32), (512, 1, 28, 28), (64, 3, 224, 224)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for shape in shapes:
            for K in ([10] if quick else [1, 10]):
                x = torch.rand(shape, device=device)
                g = torch.randn(shape, device=device)
                eps_list = [0.3 * (k + 1) / K for k in range(K)]
                eps = torch.tensor(eps_list, dtype=torch.float64)

                def fused():
                    return torch.ops.robustops.fgsm_step(x, g, eps, 0.0, 1.0)

                def eager():
                    return torch.stack([torch.clamp(x + e * g.sign(), 0.0, 1.0) for e in eps_list])

                records.append(
                    compare("fgsm_step", f"{device}:{'x'.join(map(str, shape))} K={K}", "robustops.fgsm_step",
                            fused, "eager stack(clamp(x+e*sign(g)))", eager,
                            min_run_time=0.3 if quick else 1.0)
                )
    return records


if __name__ == "__main__":
    for r in run():
        print(r)
