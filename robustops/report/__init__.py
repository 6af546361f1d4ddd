"""``robustops report``: one command, a robustness report a person reads.

:func:`generate` trains (or loads) the model(s), runs the five sections - robustness, fragile
kernels, detection, explanations, speed - and writes ``OUT/index.html`` (self-contained: figures
embedded as base64 PNG, also saved beside it), the PNG figures and ``OUT/results.json``. Every
number is computed in the run. Sections whose package is missing say so in the report.

Under ``torchrun`` the evaluation loops (attack curves, detector scores, signatures) are sharded
over the ranks in fixed chunks and gathered in order, so the numbers equal one process's; rank 0
writes the files.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import figures, html
from ._inputs import DATA_CHOICES, UsageError, build_models, load_data, prepare_out
from ._shard import broadcast_module, is_main, progress_enabled, set_progress, world
from .sections import SECTIONS, Context, Section, Settings, run_section

__all__ = ["generate", "ReportResult", "UsageError", "SECTION_NAMES", "DATA_CHOICES"]

SECTION_NAMES = tuple(SECTIONS)


@dataclass
class ReportResult:
    results: dict
    sections: List[Section]
    model_labels: List[str]
    out: Optional[str]
    html_path: Optional[str]
    json_path: Optional[str]
    models: list = None          # the ModelEntry objects (model, label, source)
    bundle: object = None        # the DataBundle the report ran on

    def summary(self) -> str:
        return html.summary_table(self.sections, self.model_labels)


def jsonable(obj):
    """Tensors, numpy values, NaN/inf -> plain JSON values (NaN and inf become null)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    return str(obj)


def _defaults(data: str, quick: bool):
    """(epochs, train_limit, test_limit) for a data set."""
    if data == "digits":
        return (4 if quick else 15), None, None
    return (1 if quick else 3), (2000 if quick else 10000), (200 if quick else 1000)


def generate(*, data: str = "digits", root: Optional[str] = None, model: Optional[str] = None,
             weights: Optional[str] = None, torchscript: Optional[str] = None, device: str = "cpu", seed: int = 0,
             out: Optional[str] = "report", quick: bool = False, sections: Optional[Sequence[str]] = None,
             epochs: Optional[int] = None, eps: Optional[float] = None, limit: Optional[int] = None,
             train_limit: Optional[int] = None, twin: Optional[bool] = None, debug: bool = False,
             progress: Optional[bool] = None, log=print) -> ReportResult:
    """Run the report and (with ``out``) write ``index.html``, PNGs and ``results.json`` into ``out``.

    Args:
        data: one of ``digits`` (embedded, default), ``fashion-mnist``, ``mnist``, ``cifar10``;
            ``root`` is the folder with its files.
        model: a ``robustops.models`` architecture name (default ``small_cnn``); trained here unless
            ``weights`` (a state_dict, loaded with ``weights_only=True``) is given. ``torchscript``:
            a ``torch.jit.save`` file instead. With none of them, the report shows the architecture
            and its compact-convolution (CCN) twin trained the same way, side by side.
        sections: subset of :data:`SECTION_NAMES` (default: all five, in order).
        quick: small settings (tests, a first look): seconds to half a minute on digits.
        epochs / eps / limit / train_limit: training epochs, the L-inf attack budget, the number of
            evaluation images, the number of training images.

    Raises:
        UsageError: bad input the user can fix (message names the problem and the fix).
    """
    set_progress(progress)
    keys = list(sections) if sections else list(SECTION_NAMES)
    bad = [k for k in keys if k not in SECTIONS]
    if bad:
        raise UsageError(f"unknown section(s) {', '.join(bad)}; use any of {', '.join(SECTION_NAMES)}")
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {epochs}")
    if eps is not None and not (0 < eps <= 1):
        raise UsageError(f"--eps must be in (0, 1] (pixels in [0, 1]), got {eps}")
    if limit is not None and limit < 8:
        raise UsageError(f"--limit must be >= 8 images, got {limit}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r} is not a device ({e}); use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
    out_dir = prepare_out(out) if (out and is_main()) else (os.path.abspath(out) if out else None)
    t_start = time.perf_counter()
    d_epochs, d_train, d_test = _defaults(data, quick)
    bundle = load_data(data, root, train_limit=train_limit if train_limit is not None else d_train,
                       test_limit=limit if limit is not None else d_test, seed=seed)
    entries = build_models(bundle, arch=model, weights=weights, torchscript=torchscript, device=dev, seed=seed,
                           epochs=epochs or d_epochs, twin=twin, progress=progress_enabled())
    log(f"data: {bundle.describe()}")
    for me in entries:
        broadcast_module(me.model)   # under torchrun every rank evaluates rank 0's weights
        me.model.eval()
        extra = f", trained in {me.train_seconds:.1f} s" if me.train_seconds is not None else ""
        log(f"model: {me.label}: {me.parameters:,} parameters{extra}")
    st = Settings.make(bundle, quick, eps)
    if limit is not None:
        st.n_eval = bundle.x_test.shape[0]
    st.n_cw, st.n_aa, st.n_sig = (min(v, st.n_eval) for v in (st.n_cw, st.n_aa, st.n_sig))
    workdir = out_dir or _tmpdir()
    ctx = Context(bundle, entries, workdir, seed, st, dev, figures=figures.have_matplotlib())
    done: List[Section] = []
    for k in keys:
        log(f"section {k} ...")
        sec = run_section(k, ctx, debug=debug)
        done.append(sec)
        msg = f" ({sec.message})" if sec.message else ""
        log(f"section {k}: {sec.status} in {sec.seconds:.1f} s{msg}")
    if not ctx.figures:
        for sec in done:
            if sec.status == "ok":
                sec.note("matplotlib is not installed, so this section has no figures (pip install robustops[xai]).")
    total = time.perf_counter() - t_start
    import robustops

    rank, size = world()
    labels = [m.label for m in entries]
    models_info = {m.label: {"source": m.source, "parameters": m.parameters, "train_seconds": m.train_seconds,
                             "history": m.history} for m in entries}
    results = {
        "robustops_version": robustops.__version__, "build_info": robustops.build_info(),
        "torch_version": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "threads": torch.get_num_threads(), "world_size": size, "seconds_total": total,
        "config": {"data": data, "root": root, "model": model, "weights": weights, "torchscript": torchscript,
                   "device": str(dev), "seed": seed, "quick": quick, "sections": keys,
                   "epochs": epochs or d_epochs, "settings": vars(st)},
        "data": {"name": bundle.name, "train_images": int(bundle.x_train.shape[0]),
                 "eval_images": int(st.n_eval), "shape": [bundle.channels, bundle.size, bundle.size],
                 "classes": bundle.num_classes},
        "models": models_info,
        "sections": {s.key: {"title": s.title, "status": s.status, "message": s.message, "seconds": s.seconds,
                             "how_to_read": s.howto, "summary": s.summary, "data": s.data} for s in done},
    }
    html_path = json_path = None
    if out_dir and rank == 0:
        results["figures"] = sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))
        json_path = os.path.join(out_dir, "results.json")
        with open(json_path, "w") as f:
            json.dump(jsonable(results), f, indent=1)
        sub = [f"{bundle.describe()}.",
               "Models: " + "; ".join(f"{m.label} ({m.parameters:,} parameters)" for m in entries) + ".",
               f"Every number and figure below was computed in this run ({total:.0f} s, seed {seed}"
               f"{', quick settings' if quick else ''}{f', {size} ranks' if size > 1 else ''})."]
        footer = [f"robustops {robustops.__version__}; torch {torch.__version__}; Python {platform.python_version()}; "
                  f"{torch.get_num_threads()} threads; build: {json.dumps(robustops.build_info())}",
                  "Raw numbers: results.json beside this file. Figures are embedded and also saved as PNG files here.",
                  f"Command: robustops report --data {data}" + (f" --model {model}" if model else "") +
                  (" --quick" if quick else "") + f" --seed {seed}"]
        html_path = html.write_html(os.path.join(out_dir, "index.html"), title="robustops robustness report",
                                    subtitle=sub, sections=done, model_labels=labels, models_info=models_info,
                                    footer=footer)
    return ReportResult(results, done, labels, out_dir, html_path, json_path, entries, bundle)


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="robustops-report-")
