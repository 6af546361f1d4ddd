"""Versioning and torch pinning of a build (issue #16): one version everywhere, the flavour label,
the ABI rule, and the ImportError a build gives under a torch it was not compiled against,
raised before robustops._C is loaded (tested by faking the recorded build, no rebuild)."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from importlib import metadata

import pytest
import torch

import robustops
from robustops import _version
from robustops._version import local_label, mismatch_message, torch_mismatch, torch_requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG_DIR = pathlib.Path(robustops.__file__).resolve().parent

try:
    from robustops import _build_meta
except ImportError:  # a tree whose _C was copied in, not built here
    _build_meta = None
needs_meta = pytest.mark.skipif(_build_meta is None, reason="robustops/_build_meta.py absent: core not built in this tree")


# ---------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "built, built_cuda, running, running_cuda",
    [
        ("2.13.0+cpu", None, "2.13.0+cpu", None),
        ("2.13.0+cpu", None, "2.13.1", None),  # patch releases keep the C++ ABI
        ("2.13.1+cpu", None, "2.13.0+cpu", None),
        ("2.13.0+cpu", None, "2.13.0+cu130", "13.0"),  # a CPU build in a CUDA torch: CPU ops only
        ("2.14.1+cu130", "13.0", "2.14.0+cu130", "13.0"),
        ("2.14.1+cu128", "12.8", "2.14.1+cu126", "12.6"),  # same CUDA major: same libcudart.so.12
        ("2.14.0.dev20260101+cpu", None, "2.14.0.dev20260101+cpu", None),
    ],
)
def test_rule_accepts(built, built_cuda, running, running_cuda):
    assert torch_mismatch(built, built_cuda, True, running, running_cuda, True) is None


@pytest.mark.parametrize(
    "built, built_cuda, running, running_cuda, reason",
    [
        ("2.13.0+cpu", None, "2.14.1+cpu", None, "major.minor must match"),
        ("2.13.0+cpu", None, "2.12.0+cpu", None, "major.minor must match"),
        ("2.13.0", None, "3.13.0", None, "major.minor must match"),
        ("2.14.0.dev20260101+cpu", None, "2.14.0.dev20260102+cpu", None, "nightly"),
        ("2.14.0rc1", None, "2.14.0", None, "pre-release"),
        ("2.14.1+cu130", "13.0", "2.14.1+cpu", None, "needs a CUDA build of torch"),
        ("2.14.1+cu130", "13.0", "2.14.1+cu128", "12.8", "different major versions"),
    ],
)
def test_rule_refuses(built, built_cuda, running, running_cuda, reason):
    why = torch_mismatch(built, built_cuda, True, running, running_cuda, True)
    assert why is not None and reason in why


def test_rule_cxx11_abi():
    assert "_GLIBCXX_USE_CXX11_ABI" in torch_mismatch("2.13.0", None, False, "2.13.0", None, True)
    assert torch_mismatch("2.13.0", None, None, "2.13.0", None, True) is None  # unknown: not compared


def test_labels_and_pins():
    assert local_label(None) == "cpu"
    assert local_label("13.0") == "cu130"
    assert local_label("12.6") == "cu126"
    assert torch_requirement("2.13.0+cpu") == "torch==2.13.*"
    assert torch_requirement("2.14.0.dev20260101+cu130") == "torch==2.14.0.dev20260101"


def test_message_names_both_versions_and_the_fix():
    msg = mismatch_message("0.1.0+cpu", "2.13.0+cpu", None, "2.14.1+cu130", "13.0", "REASON")
    assert "robustops 0.1.0+cpu" in msg and "torch 2.13.0+cpu (CPU-only)" in msg
    assert "torch 2.14.1+cu130 (CUDA 13.0)" in msg and "REASON" in msg
    assert "reinstall robustops built against your torch" in msg
    assert "--no-build-isolation" in msg and "+cu130" in msg and "torch==2.13.*" in msg


# ---------------------------------------------------------------------------------------------
# the import-time check, by faking the recorded build in a copy of the package
# ---------------------------------------------------------------------------------------------
_PROBE = """
import sys
try:
    import robustops
except ImportError as e:
    print("IMPORT_ERROR:" + str(e))
else:
    print("IMPORTED:" + robustops.__version__)
print("C_LOADED:" + str("robustops._C" in sys.modules))
"""


def _import_with_meta(tmp_path, meta: dict, env_extra=None):
    pkg = tmp_path / "robustops"
    shutil.copytree(PKG_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "_build_meta.py"))
    base = {"version": "0.1.0+cpu", "torch_version": torch.__version__, "torch_cuda_version": torch.version.cuda,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "debug": False}
    base.update(meta)
    (pkg / "_build_meta.py").write_text("".join(f"{k} = {v!r}\n" for k, v in base.items()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", _version.SKIP_ENV)}
    env["PYTHONPATH"] = str(tmp_path)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    return lines, out.stderr


def _other_minor():
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return f"{major}.{minor - 1 if minor > 0 else minor + 1}.0+cpu"


def test_import_refuses_other_torch_minor_before_loading_C(tmp_path):
    fake = _other_minor()
    lines, stderr = _import_with_meta(tmp_path, {"torch_version": fake})
    msg = lines.get("IMPORT_ERROR", "")
    assert msg, f"import did not fail: {lines} {stderr}"
    assert f"compiled against torch {fake}" in msg and f"runs torch {torch.__version__}" in msg
    assert "reinstall robustops built against your torch" in msg
    assert "undefined symbol" not in msg + stderr
    assert lines["C_LOADED"] == "False"  # refused before the dynamic loader saw _C


def test_import_refuses_cuda_build_under_cpu_torch(tmp_path):
    if torch.version.cuda:
        pytest.skip("running torch has CUDA")
    lines, _ = _import_with_meta(tmp_path, {"version": "0.1.0+cu130", "torch_cuda_version": "13.0"})
    msg = lines.get("IMPORT_ERROR", "")
    assert "(CUDA 13.0)" in msg and "needs a CUDA build of torch" in msg and "+cpu label" in msg
    assert lines["C_LOADED"] == "False"


def test_import_accepts_matching_build_and_skip_switch(tmp_path):
    lines, _ = _import_with_meta(tmp_path, {})
    assert lines.get("IMPORTED") == "0.1.0+cpu" and lines["C_LOADED"] == "True"
    # the escape hatch only skips the check (this core does match, so it then loads)
    lines, stderr = _import_with_meta(tmp_path / "skip", {"torch_version": _other_minor()},
                                      {_version.SKIP_ENV: "1"})
    assert "IMPORTED" in lines and lines["C_LOADED"] == "True"


# ---------------------------------------------------------------------------------------------
# one version: _version.py, __version__, build_info(), the metadata, `robustops info`
# ---------------------------------------------------------------------------------------------
def test_build_info_records_the_build():
    info = robustops.build_info()
    assert info["torch_version"].split("+")[0].split(".")[:2] == torch.__version__.split(".")[:2]
    assert info["cuda_version"] == (torch.version.cuda if info["cuda"] else None)
    assert info["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert info["debug"] is False or os.environ.get("DEBUG")


@needs_meta
def test_one_version_everywhere():
    info = robustops.build_info()
    assert robustops.__version__ == info["version"] == _build_meta.version
    assert (_build_meta.torch_version, _build_meta.torch_cuda_version) == (info["torch_version"], info["cuda_version"])
    base, _, label = robustops.__version__.partition("+")
    assert base == _version.__version__
    if "ROBUSTOPS_LOCAL_VERSION" not in os.environ:
        assert label == local_label(info["cuda_version"])


def _installed_from_this_tree():
    """The installed distribution whose direct_url points at this tree (an editable install), if any."""
    for dist in metadata.distributions(name="robustops"):
        raw = dist.read_text("direct_url.json")
        url = json.loads(raw).get("url", "") if raw else ""
        if url.startswith("file://"):
            path = pathlib.Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).resolve()
            if path == PKG_DIR.parent:
                return dist
    return None


@needs_meta
def test_metadata_and_cli_agree():
    dist = _installed_from_this_tree()
    if dist is None:
        pytest.skip("robustops's metadata is from another tree (PYTHONPATH use)")
    assert dist.version == robustops.__version__
    pins = [r for r in dist.requires or [] if r.split(";")[0].replace(" ", "").startswith(("torch=", "torch>", "torch<"))]
    assert pins == [torch_requirement(_build_meta.torch_version)]
    out = subprocess.run([sys.executable, "-m", "robustops.cli", "info"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert robustops.__version__ in out.stdout


# ---------------------------------------------------------------------------------------------
# the wheel smoke script: covers every registered op, fails on an op without a smoke call
# ---------------------------------------------------------------------------------------------
def _smoke_module():
    spec = importlib.util.spec_from_file_location("wheel_smoke", ROOT / "scripts" / "wheel_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_runs_every_registered_op():
    smoke = _smoke_module()
    registered, missing = smoke.run_ops(robustops)
    assert {"robustops::fgsm_step", "robustops::compact_conv2d", "robustops::compact_linear",
            "robustops::kernel_dropout_eval"} <= set(registered)
    assert missing == []
    partial = {k: v for k, v in smoke.SMOKE.items() if k != "robustops::compact_linear"}
    _, missing = smoke.run_ops(robustops, partial)
    assert missing == ["robustops::_compact_linear_backward", "robustops::compact_linear"]


def test_smoke_reference_catches_a_wrong_result(monkeypatch):
    smoke = _smoke_module()

    class Wrong:
        @staticmethod
        def fgsm_step(x, g, eps):
            return robustops.ops.fgsm_step(x, g, [e * 1.01 for e in eps])

    with pytest.raises(AssertionError, match="fgsm_step"):
        smoke.smoke_fgsm_step(Wrong, "cpu")
