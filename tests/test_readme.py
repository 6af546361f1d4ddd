"""The README's five-minute tour runs: every ```python block of the tour section, top to bottom, in
one namespace (so the README never rots). A block that imports a part of the package this build does
not have yet (robustops.detect, robustops.xai, AutoAttack) is skipped with that reason."""
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOUR = "## A five-minute tour of the Python API"


def tour_blocks():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(TOUR)
    nxt = text.find("\n## ", start + len(TOUR))
    section = text[start:nxt if nxt >= 0 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


BLOCKS = tour_blocks()
NAMESPACE: dict = {}
OPTIONAL = [("from robustops.detect import", "robustops.detect", "RelevantNeuronDetector"),
            ("from robustops import xai", "robustops.xai", "lrp"),
            ("import AutoAttack", "robustops.attacks", "AutoAttack")]


def test_tour_has_every_part():
    joined = "\n".join(BLOCKS)
    assert len(BLOCKS) >= 6
    for needle in ("rnn.compactify", "robust_accuracy_curve", "AutoAttack", "kernel_dropout",
                   "RelevantNeuronDetector", "xai.lrp"):
        assert needle in joined, needle


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_tour_block_runs(i, capsys):
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    code = BLOCKS[i]
    for needle, module, attr in OPTIONAL:
        if needle in code:
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                pytest.skip(f"{module} does not import in this build: {e}")
            if not hasattr(mod, attr):
                pytest.skip(f"{module}.{attr} is not in this build yet")
    if "umap" in code and importlib.util.find_spec("umap") is None:
        code = code.replace('method="umap"', 'method="pca"')
    if i > 0 and "model" not in NAMESPACE:
        pytest.skip("the first block (which trains the model) did not run")
    exec(compile(code, f"README.md tour block {i + 1}", "exec"), NAMESPACE)
    out = capsys.readouterr().out
    if "print(" in code:
        assert out.strip(), "the block printed nothing"
    if i == 0:
        acc = [float(v) for v in re.findall(r"0\.\d+|1\.0", out)]
        assert len(acc) == 2 and min(acc) > 0.8, out   # both models learned the digits
