"""examples/detect_experiment.py end to end in its smallest form (the README's Table 1 / 3
script): one attack, one setting of ours, the baselines, the JSON record; attacks and forwards
split into chunks smaller than the data (the path the paper-scale runs take)."""
import argparse
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "detect_experiment.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("detect_experiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_records_the_chosen_settings(experiment, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiment, "CHUNK", 64)              # 200 / 100 images: several chunks each
    out = tmp_path / "r.json"
    experiment.main(["--quick", "--attacks", "FGSM eps=0.3", "--mus", "10", "--variants", "shared",
                     "--labels", "label", "--json", str(out)])
    printed = capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert rec["settings"]["mus"] == [10] and rec["settings"]["variants"] == ["shared"]
    (res,) = rec["results"]
    assert res["dataset"] == "digits" and list(res["attacks"]) == ["FGSM eps=0.3"]
    assert res["baseline_clean_source"] == "images the model was trained on"   # digits: no unseen training images
    ar = res["attacks"]["FGSM eps=0.3"]
    assert list(ar["ours"]) == ["mu=10|shared|label"]                # only the chosen setting ran
    assert ar["n_adv_train"] > 100 and ar["n_adv_test"] > 50         # eps 0.3 fools most of them
    # detection works on this easy case (seeded run: ours 0.81, NIC 0.97; chance is ~0.5)
    assert 0.65 < ar["ours"]["mu=10|shared|label"] <= 1.0
    assert 0.65 < ar["NIC"]["accuracy"] <= 1.0
    assert 0.0 <= ar["FS"]["fpr"] <= 0.15                            # threshold at 5% FPR on clean training images
    c = ar["counts"]["mu=10|shared"]
    assert 0 <= c["min"] <= c["mean"] <= c["max"] <= c["of"] == 592
    assert "FGSM eps=0.3" in printed and "| ours mu=10 |" in printed


def test_baseline_clean_from_unseen_takes_training_images_after_the_models_own(experiment, monkeypatch):
    """Fashion-MNIST's split: the model trains on the first --n-model-train training images;
    --baseline-clean-from unseen loads the whole split and hands back the rest (never trained on)."""
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1) / 50
    y = torch.arange(50) % 10
    calls = []

    def fake_load(name, split, limit=None):
        calls.append((split, limit))
        n = 50 if split == "train" else 20
        n = n if limit is None else min(limit, n)
        return x[:n], y[:n]

    monkeypatch.setattr(experiment, "data", types.SimpleNamespace(load=fake_load, as_tensors=lambda d: d))
    args = argparse.Namespace(n_model_train=30, n_test=5, epochs_fashion=2, baseline_clean_from="unseen")
    xtr, ytr, xte, yte, epochs, xun, yun = experiment.load("fashion-mnist", args)
    assert torch.equal(xtr, x[:30]) and torch.equal(ytr, y[:30])
    assert torch.equal(xun, x[30:]) and torch.equal(yun, y[30:])       # disjoint from the model's images
    assert calls == [("train", None), ("test", 20)] and xte.shape[0] == 20 and epochs == 2
    calls.clear()
    args.baseline_clean_from = "model-train"                              # the earlier protocol: load only what trains
    xtr, _, _, _, _, xun, _ = experiment.load("fashion-mnist", args)
    assert calls[0] == ("train", 30) and torch.equal(xtr, x[:30]) and xun.shape[0] == 0
