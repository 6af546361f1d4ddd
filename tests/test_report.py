"""robustops.report: numbers against independent computations, the HTML page, missing/failed
sections, sharding (2 torchrun ranks give the one-process numbers) and the headless-Chromium check."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from robustops import models
from robustops.attacks import PGD, deepfool, robust_accuracy_curve
from robustops.report import generate, jsonable, sections as S
from robustops.report._shard import map_chunks
from robustops.report.html import summary_table, write_html

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    return generate(out=str(out), quick=True, progress=False, log=lambda m: None)


def _eval_set(rep):
    n = rep.results["data"]["eval_images"]
    return rep.bundle.x_test[:n], rep.bundle.y_test[:n]


@pytest.mark.slow
def test_robustness_numbers_match_independent_runs(quick_report):
    rep = quick_report
    x, y = _eval_set(rep)
    rob = rep.results["sections"]["robustness"]["data"]
    st = rep.results["config"]["settings"]
    for me in rep.models:
        r = rob["models"][me.label]
        acc, _ = models.evaluate(me.model, (x, y))
        assert r["clean_accuracy"] == pytest.approx(acc, abs=1e-12)
        # FGSM curve over the whole set in one batch (the report runs it in chunks)
        ref = robust_accuracy_curve(me.model, (x, y), r["fgsm"]["eps"], batch_size=x.shape[0])
        assert r["fgsm"]["accuracy"] == pytest.approx(ref.tolist(), abs=1.01 / x.shape[0])
        assert r["fgsm"]["accuracy"][0] == pytest.approx(acc, abs=1e-12)  # eps 0 = clean
        # PGD with the per-chunk seeds the report uses
        c = st["chunk"]
        correct = 0
        for ci, s in enumerate(range(0, x.shape[0], c)):
            xa = PGD(me.model, eps=r["pgd"]["eps"], alpha=r["pgd"]["alpha"], steps=r["pgd"]["steps"],
                     random_start=True, seed=0 + ci)(x[s:s + c], y[s:s + c])
            correct += int((me.model(xa).argmax(1) == y[s:s + c]).sum())
        assert r["pgd"]["accuracy"] == pytest.approx(correct / x.shape[0], abs=1e-12)
        assert r["pgd"]["accuracy"] <= r["clean_accuracy"]
        # DeepFool rho_adv (eq. 9) of the whole set in one call
        df = deepfool(me.model, x, y, steps=r["deepfool"]["steps"])
        assert r["deepfool"]["rho_adv"] == pytest.approx(float(df.rho_adv), rel=1e-4, abs=1e-6)
        assert r["cw_l2"]["mean_l2"] is None or r["cw_l2"]["mean_l2"] > 0
        assert set(r["seconds"]) >= {"clean", "fgsm", "pgd", "deepfool", "cw_l2"}


@pytest.mark.slow
def test_fragile_numbers_match_naive_loop(quick_report):
    from robustops.fragile import kernel_dropout_naive

    rep = quick_report
    x, y = _eval_set(rep)
    frag = rep.results["sections"]["fragile"]["data"]["models"]
    for me in rep.models:
        f = frag[me.label]
        acc, _, base = kernel_dropout_naive(me.model, f["layer"], (x, y))
        assert f["accuracy_without_kernel"] == pytest.approx(torch.as_tensor(acc).tolist(), abs=1e-9)
        assert f["baseline_accuracy"] == pytest.approx(float(base), abs=1e-12)
        assert sorted(f["fragile"] + f["null"]) == list(range(f["kernels"]))
        mean = sum(f["accuracy_without_kernel"]) / f["kernels"]
        assert all(f["accuracy_without_kernel"][k] < mean + 1e-12 for k in f["fragile"])


@pytest.mark.slow
def test_page_json_and_figures(quick_report):
    rep = quick_report
    html = open(rep.html_path, encoding="utf-8").read()
    # every section present, in order, each with its one-sentence reading guide (or its failure)
    pos = [html.index(f'data-section="{k}"') for k in ("robustness", "fragile", "detection", "explanations", "speed")]
    assert pos == sorted(pos)
    assert html.count("How to read this.") == 5
    for sec in rep.sections:
        assert sec.status in ("ok", "missing"), (sec.key, sec.message)
        if sec.status == "missing":
            assert sec.message in html.replace("&#x27;", "'").replace("&quot;", '"') or "Not available" in html
    # figures: embedded (offline) and saved beside the page
    n_fig = sum(1 for s in rep.sections for b in s.blocks if b[0] == "figure")
    assert html.count('<img src="data:image/png;base64,') == n_fig >= 3
    assert "http://" not in html and "https://" not in html
    for png in rep.results["figures"]:
        assert os.path.getsize(os.path.join(rep.out, png)) > 1000
    # results.json: strict JSON (no NaN), the same numbers as the returned dict
    with open(rep.json_path) as f:
        res = json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert res == json.loads(json.dumps(jsonable(rep.results)))
    assert res["build_info"] and res["robustops_version"]
    # the terminal table: one column per model
    table = rep.summary()
    assert "small_cnn (CCN)" in table.splitlines()[0] and "clean accuracy" in table


@pytest.mark.slow
def test_speed_records(quick_report):
    recs = quick_report.results["sections"]["speed"]["data"]["records"]
    assert [r["op"] for r in recs] == ["fgsm_step", "robust_accuracy_curve", "compact_conv2d", "kernel_dropout"]
    for r in recs:
        assert r["median_s"] > 0 and r["reference_median_s"] > 0
        assert r["ratio"] * r["speedup"] == pytest.approx(1.0)


def test_map_chunks_single_process():
    x = torch.arange(10.0)
    out = map_chunks(lambda ci, s, e: {"v": x[s:e] * 2, "chunk_id": ci}, 10, 3)
    assert torch.equal(out["v"], x * 2)
    assert out["chunk_id"] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="rows"):
        map_chunks(lambda ci, s, e: {"v": torch.zeros(1)}, 10, 3)


def test_jsonable():
    d = jsonable({"a": torch.tensor([1.0, float("nan")]), "b": float("inf"), 3: (1, 2)})
    assert d == {"a": [1.0, None], "b": None, "3": [1, 2]}


def test_missing_package_is_reported_not_hidden(tmp_path, monkeypatch):
    """A section whose package does not import says so in the page, the JSON and the table."""
    monkeypatch.setattr(S, "_optional", lambda name: (None, f"ImportError: No module named {name!r}"))
    ctx = S.Context(bundle=None, models=[], out=str(tmp_path), seed=0, settings=None, device=torch.device("cpu"))
    ctx.models = [type("M", (), {"label": "m"})()]
    for key in ("detection", "explanations"):
        sec = S.run_section(key, ctx)
        assert sec.status == "missing" and "No module named" in sec.message
    page = write_html(str(tmp_path / "index.html"), title="t", subtitle=[], sections=[sec], model_labels=["m"],
                      models_info={}, footer=[])
    text = open(page).read()
    assert 'data-status="missing"' in text and "Not available" in text
    assert "missing" in summary_table([sec], ["m"])


def test_failed_section_is_reported(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("kaput")

    monkeypatch.setitem(S.SECTIONS, "speed", boom)
    sec = S.run_section("speed", None)
    assert sec.status == "failed" and "kaput" in sec.message and "Traceback" in sec.data["traceback"]
    with pytest.raises(RuntimeError):
        S.run_section("speed", None, debug=True)


@pytest.mark.slow
def test_two_torchrun_ranks_give_one_process_numbers(tmp_path):
    """Sharded evaluation loops (attack curves, detector scores, signatures) = one process."""
    torch.manual_seed(0)
    from robustops import data

    m = models.small_cnn()
    xt, yt = data.as_tensors(data.load("digits", split="train"))
    models.train(m, (xt, yt), epochs=2, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    w = tmp_path / "w.pt"
    torch.save(m.state_dict(), w)
    args = ["report", "--quick", "--weights", str(w), "--sections", "robustness", "detection", "explanations",
            "--no-progress", "--limit", "70"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    one = subprocess.run([sys.executable, "-m", "robustops.cli", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as sock:  # a free port: other torchrun jobs may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          "-m", "robustops.cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stdout + two.stderr
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if "second" not in k and k != "seconds"}
        if isinstance(d, list):
            return [strip(v) for v in d]
        return d

    for key in ("robustness", "detection", "explanations"):
        assert a["sections"][key]["status"] == b["sections"][key]["status"]
        assert strip(a["sections"][key]["data"]) == strip(b["sections"][key]["data"]), key
    assert a["sections"]["robustness"]["data"]["settings"]["n_eval"] == 70


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium (apt-get install chromium) for the render check")
def test_report_renders_in_headless_chromium(quick_report, tmp_path):
    shot = tmp_path / "shot.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "report_check.py"), quick_report.out,
                        "--screenshot", str(shot), "--height", "1600"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert shot.stat().st_size > 10000
    # and the check does fail on a broken figure
    broken = tmp_path / "broken"
    broken.mkdir()
    html = open(quick_report.html_path, encoding="utf-8").read()
    i = html.index('<img src="data:image/png;base64,') + len('<img src="')
    (broken / "index.html").write_text(html[:i] + "missing.png" + html[html.index('"', i):], encoding="utf-8")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "report_check.py"), str(broken),
                        "--screenshot", str(tmp_path / "b.png"), "--height", "600"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "broken image" in r.stderr
