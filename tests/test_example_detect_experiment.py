"""examples/detect_experiment.py end to end in its smallest form (the README's Table 1 / 3
script): one attack, one setting of ours, the baselines, the JSON record; attacks and forwards
split into chunks smaller than the data (the path the paper-scale runs take)."""
import importlib.util
import json
from pathlib import Path

import pytest

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
