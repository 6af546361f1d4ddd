"""The ``robustops`` command line, run as a subprocess: every subcommand in --quick mode, and every
bad-input case (exit code 2, one line naming the problem and the fix, no traceback)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from robustops import data, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "robustops.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small_cnn trained for 2 epochs on digits, saved as a state_dict."""
    torch.manual_seed(0)
    model = models.small_cnn()
    x, y = data.as_tensors(data.load("digits", split="train"))
    models.train(model, (x, y), epochs=2, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    path = tmp_path_factory.mktemp("w") / "small_cnn.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_help_of_every_subcommand(capsys):
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("report", "attack", "fragile", "detect", "explain", "bench", "info"):
        assert cmd in r.stdout
    h = run_cli("report", "--help")
    assert h.returncode == 0 and "usage: robustops report" in h.stdout and "--sections" in h.stdout
    from robustops.cli import main

    for cmd in ("attack", "fragile", "detect", "explain", "bench", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: robustops " + cmd in out
        if cmd != "info":
            for opt in ("--data", "--root", "--model", "--weights", "--torchscript", "--device", "--seed", "--out",
                        "--quick", "--json", "--debug"):
                assert opt in out, (cmd, opt)


def test_info_prints_version_and_build_info():
    import robustops

    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert f"robustops {robustops.__version__}" in r.stdout
    assert "build_info:" in r.stdout and "torch_version" in r.stdout
    j = run_cli("info", "--json")
    info = json.loads(j.stdout)
    assert info["version"] == robustops.__version__
    assert info["build_info"] == json.loads(json.dumps(robustops.build_info()))
    assert set(info["optional"]) >= {"robustops.detect", "robustops.xai", "AutoAttack", "umap-learn"}


@pytest.mark.slow
@pytest.mark.parametrize("cmd,section,row", [
    ("attack", "robustness", "clean accuracy"),
    ("fragile", "fragile", "fragile S / null S'"),
    ("detect", "detection", "3. Detecting"),
    ("explain", "explanations", "4. Explanations"),
    ("bench", "speed", "speed-up fgsm_step"),
])
def test_subcommand_quick(cmd, section, row, weights, tmp_path):
    out = tmp_path / "out"
    extra = ["--json"] if cmd == "attack" else []
    r = run_cli(cmd, "--quick", "--weights", weights, "--out", str(out), "--no-progress", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "results.json").read_text())
    if extra:  # --json: the same results, machine-readable on stdout
        rj = json.loads(r.stdout)
        assert rj["sections"]["robustness"]["data"]["models"] == res["sections"]["robustness"]["data"]["models"]
    else:
        assert "metric" in r.stdout and "small_cnn" in r.stdout
        if section in ("detection", "explanations"):
            # the section's package may be missing in this build: then the table says so
            assert row in r.stdout or any(k in r.stdout for k in ("ROC-AUC", "heatmaps"))
        else:
            assert row in r.stdout, r.stdout
    assert list(res["sections"]) == [section]
    assert res["sections"][section]["status"] in ("ok", "missing"), res["sections"][section]["message"]
    assert res["config"]["weights"] == weights
    html = (out / "index.html").read_text()
    assert f'data-section="{section}"' in html


@pytest.mark.slow
def test_report_quick_default_twin(tmp_path):
    """The default report: small_cnn and its CCN twin trained here, all five sections in the page."""
    out = tmp_path / "rep"
    r = run_cli("report", "--quick", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "small_cnn (CCN)" in r.stdout and "report:" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert list(res["sections"]) == ["robustness", "fragile", "detection", "explanations", "speed"]
    assert list(res["models"]) == ["small_cnn", "small_cnn (CCN)"]
    html = (out / "index.html").read_text()
    for key in res["sections"]:
        assert f'data-section="{key}"' in html
        st = res["sections"][key]["status"]
        assert st in ("ok", "missing"), (key, res["sections"][key]["message"])
        if st == "missing":
            assert "Not available" in html
    assert "src=\"http" not in html and "<link" not in html  # self-contained, offline
    for png in res["figures"]:
        assert (out / png).stat().st_size > 1000


def test_bad_data_root(tmp_path):
    one_line_error(run_cli("attack", "--quick", "--data", "fashion-mnist", "--root", str(tmp_path / "nope")),
                   "--root", "not a directory")


def test_missing_data_files(tmp_path):
    one_line_error(run_cli("attack", "--quick", "--data", "mnist", "--root", str(tmp_path)),
                   "cannot load --data mnist", "--root")


def test_unknown_data_name():
    r = run_cli("attack", "--data", "imagenet")
    line = one_line_error(r, "--data", "invalid choice")
    assert "--help" in line


def test_unknown_architecture():
    one_line_error(run_cli("attack", "--quick", "--model", "resnet9000"), "unknown --model 'resnet9000'", "small_cnn")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    one_line_error(run_cli("attack", "--quick", "--weights", str(bad)), "not a readable state_dict", "torch.save")


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary unpickling is refused, not executed."""
    p = tmp_path / "pickled.pt"
    import argparse

    torch.save({"weight": torch.zeros(2), "extra": argparse.Namespace(a=1)}, p)  # not an allowed global
    one_line_error(run_cli("attack", "--quick", "--weights", str(p)), "not a readable state_dict")


def test_mismatched_checkpoint(tmp_path):
    p = tmp_path / "papernot.pt"
    torch.save(models.papernot_mnist().state_dict(), p)
    one_line_error(run_cli("attack", "--quick", "--weights", str(p)), "does not match --model small_cnn",
                   "--model")


def test_missing_checkpoint(tmp_path):
    one_line_error(run_cli("fragile", "--quick", "--weights", str(tmp_path / "nope.pt")), "no such file")


def test_corrupt_torchscript(tmp_path):
    bad = tmp_path / "bad.ts"
    bad.write_bytes(b"\x00" * 64)
    one_line_error(run_cli("attack", "--quick", "--torchscript", str(bad)), "cannot be loaded", "torch.jit.save")


def test_torchscript_for_other_data(tmp_path, weights):
    m = models.papernot_mnist().eval()
    p = tmp_path / "pap.ts"
    torch.jit.save(torch.jit.trace(m, torch.rand(1, 1, 28, 28)), str(p))
    one_line_error(run_cli("attack", "--quick", "--torchscript", str(p)), "does not run on --data digits")


def test_unwritable_out(tmp_path, weights):
    f = tmp_path / "a_file"
    f.write_text("x")
    one_line_error(run_cli("attack", "--quick", "--weights", weights, "--out", str(f)), "is a file", "directory")
    one_line_error(run_cli("attack", "--quick", "--weights", weights, "--out", "/proc/robustops-report"),
                   "cannot write to --out", "writable directory")


def test_bad_numbers(weights):
    one_line_error(run_cli("attack", "--quick", "--weights", weights, "--eps", "3"), "--eps")
    one_line_error(run_cli("attack", "--quick", "--weights", weights, "--epochs", "0"), "--epochs")
    one_line_error(run_cli("report", "--quick", "--weights", weights, "--sections", "robustnes"),
                   "unknown section", "robustness")
    one_line_error(run_cli("attack", "--quick", "--weights", weights, "--device", "cuda:0")
                   if not torch.cuda.is_available() else run_cli("attack", "--device", "nonsense"), "--device")


def test_debug_shows_traceback():
    r = run_cli("attack", "--quick", "--model", "resnet9000", "--debug")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "UsageError" in r.stderr
