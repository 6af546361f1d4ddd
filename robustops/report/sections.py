"""The five sections of the report. Each returns a :class:`Section`: its tables, figures, the
numbers for ``results.json`` and the per-model summary for the terminal. A section whose package
is missing (or that fails) comes back with ``status`` "missing" / "failed" and a message; it never
disappears from the report."""
from __future__ import annotations

import importlib
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import figures
from ._inputs import DataBundle, ModelEntry
from ._shard import is_main, map_chunks, progress_enabled

__all__ = ["Section", "Context", "robustness", "fragile", "detection", "explanations", "speed", "SECTIONS"]


@dataclass
class Section:
    key: str
    title: str
    howto: str
    status: str = "ok"            # ok | missing | failed | skipped
    message: str = ""
    blocks: List[tuple] = field(default_factory=list)
    data: Dict[str, object] = field(default_factory=dict)
    summary: Dict[str, Dict[str, str]] = field(default_factory=dict)   # model -> metric -> text
    seconds: float = 0.0

    def table(self, headers: List[str], rows: List[List[object]], caption: str = "") -> None:
        self.blocks.append(("table", headers, rows, caption))

    def figure(self, path: Optional[str], caption: str, alt: str = "") -> None:
        if path:
            self.blocks.append(("figure", path, caption, alt or caption))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def finding(self, text: str) -> None:
        """A sentence computed from this run's numbers (what stands out)."""
        self.blocks.append(("finding", text))

    def put(self, model: str, metric: str, value: str) -> None:
        self.summary.setdefault(model, {})[metric] = value


@dataclass
class Settings:
    quick: bool
    n_eval: int
    chunk: int
    fgsm_eps: List[float]
    attack_eps: float
    pgd_steps: int
    deepfool_steps: int
    n_cw: int
    cw_steps: int
    cw_search: int
    n_aa: int
    n_det_train: int
    det_eps: float
    det_trees: int
    n_sig: int
    n_heat: int
    frag_eps: List[float]

    @classmethod
    def make(cls, bundle: DataBundle, quick: bool, attack_eps: Optional[float]) -> "Settings":
        n = bundle.x_test.shape[0]
        big = bundle.size >= 28
        eps = attack_eps if attack_eps is not None else (0.1 if bundle.name == "digits" else
                                                         (8 / 255 if bundle.channels == 3 else 0.1))
        if quick:
            return cls(True, min(n, 96), 32, [0.0, 0.05, 0.1, 0.2, 0.3], eps, 5, 20, min(n, 16), 10, 2,
                       min(n, 16), 96, 0.2, 30, min(n, 48), 3, [0.02, 0.1])
        return cls(False, n, 64, [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3], eps, 20, 50, min(n, 100),
                   50 if not big else 30, 4, min(n, 64), 600, 0.2, 300, min(n, 400), 4,
                   [0.01, 0.02, 0.05, 0.1, 0.2])


@dataclass
class Context:
    bundle: DataBundle
    models: List[ModelEntry]
    out: str
    seed: int
    settings: Settings
    device: torch.device
    figures: bool = True
    cache: Dict[str, object] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def fig(self, name: str, fn, *args, **kw) -> Optional[str]:
        """Draw a figure on rank 0 (when matplotlib is there); the PNG path, or None."""
        if not (self.figures and is_main()):
            return None
        return fn(*args, path=self.path(name), **kw)

    def eval_xy(self) -> Tuple[torch.Tensor, torch.Tensor]:
        n = self.settings.n_eval
        return self.bundle.x_test[:n].to(self.device), self.bundle.y_test[:n].to(self.device)


def _optional(module: str):
    """``(module, None)`` or ``(None, reason)``."""
    try:
        return importlib.import_module(module), None
    except Exception as e:  # ImportError, or an error inside a half-finished package
        return None, f"{type(e).__name__}: {e}"


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _num(v: Optional[float], fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _secs(v: float) -> str:
    if v < 1e-3:
        return f"{v * 1e6:.0f} us"
    if v < 0.01:
        return f"{v * 1e3:.2f} ms"
    return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"


# ----------------------------------------------------------------------------------------------
# 1. Robustness
# ----------------------------------------------------------------------------------------------

def _autoattack_class():
    mod, why = _optional("robustops.attacks")
    if mod is None:
        return None, why
    cls = getattr(mod, "AutoAttack", None)
    if cls is None:
        return None, "robustops.attacks in this installation has no AutoAttack yet"
    return cls, None


def _run_autoattack(cls, model, x, y, eps, seed, chunk, quick=False):
    """AutoAttack on ``(x, y)`` ("standard"; quick settings: APGD-CE + APGD-T only); returns a
    JSON-able dict. AutoAttack shards its own chunks under torchrun (every rank calls it on all
    points and gets the whole result)."""
    kw = dict(norm="Linf", eps=eps, seed=seed)
    version = "standard"
    if quick:
        kw["attacks"] = ["apgd-ce", "apgd-t"]
        version = "APGD-CE + APGD-T, quick settings"
    else:
        kw["version"] = "standard"
    try:
        aa = cls(model, batch_size=chunk, warn=False, progress=progress_enabled(), **kw)
    except TypeError:  # an AutoAttack without those keywords
        aa = cls(model, **kw)
    t0 = time.perf_counter()
    x_adv = aa(x, y)
    secs = time.perf_counter() - t0
    res = getattr(aa, "last_result", None)
    with torch.no_grad():
        robust = model(x_adv).argmax(1) == y
    out = {"robust_accuracy": float(robust.double().mean()), "n": int(x.shape[0]), "eps": eps,
           "version": version, "seconds": secs, "flags": []}
    if res is not None:
        get = (lambda k, d=None: res.get(k, d)) if isinstance(res, dict) else (lambda k, d=None: getattr(res, k, d))
        ra = get("robust_accuracy")
        if ra is not None:
            out["robust_accuracy"] = float(ra)
        for f in get("flags", []) or []:
            out["flags"].append(str(f))
        acc_after = get("accuracy_after")
        if acc_after:
            out["accuracy_after"] = {str(k): float(v) for k, v in dict(acc_after).items()}
        t = get("time")
        if t:
            out["attack_seconds"] = {str(k): float(v) for k, v in dict(t).items()}
    return out


def _observations(results: dict, labels: List[str], st: "Settings", eps: float) -> List[str]:
    """Sentences computed from this run's numbers (what stands out), not canned text."""
    out = []
    k = min(range(len(st.fgsm_eps)), key=lambda j: abs(st.fgsm_eps[j] - eps))
    for l in labels:
        r = results[l]
        f, p = r["fgsm"]["accuracy"][k], r["pgd"]["accuracy"]
        if abs(st.fgsm_eps[k] - eps) < 1e-12 and f - p >= 0.15:
            out.append(f"{l}: PGD leaves {100 * p:.1f}% where FGSM leaves {100 * f:.1f}% at eps {eps:g}: a one-step "
                       f"attack overstates this model's robustness by {100 * (f - p):.0f} points.")
        a = r["autoattack"].get("robust_accuracy") if isinstance(r["autoattack"], dict) else None
        if a is not None and p - a >= 0.05:
            out.append(f"{l}: AutoAttack leaves {100 * a:.1f}%, {100 * (p - a):.0f} points below PGD: trust the "
                       f"AutoAttack number.")
    if len(labels) == 2:
        a, b = labels
        ra, rb = results[a], results[b]
        fa, fb = ra["fgsm"]["accuracy"][-1], rb["fgsm"]["accuracy"][-1]
        da, db = ra["deepfool"]["median_l2"], rb["deepfool"]["median_l2"]
        better = b if fb > fa else a
        out.append(f"At the largest FGSM eps ({st.fgsm_eps[-1]:g}) {better} keeps more accuracy "
                   f"({100 * max(fa, fb):.1f}% vs {100 * min(fa, fb):.1f}%); DeepFool needs a median L2 of "
                   f"{da:.3f} on {a} and {db:.3f} on {b} to flip a prediction.")
        aa_a = ra["autoattack"].get("robust_accuracy") if isinstance(ra["autoattack"], dict) else None
        aa_b = rb["autoattack"].get("robust_accuracy") if isinstance(rb["autoattack"], dict) else None
        fa_k, fb_k = ra["fgsm"]["accuracy"][k], rb["fgsm"]["accuracy"][k]
        if aa_a is not None and aa_b is not None and (fa_k - fb_k) * (aa_a - aa_b) < 0:
            aa_better = a if aa_a > aa_b else b
            out.append(f"The ranking flips under AutoAttack at eps {eps:g}: FGSM says {b if fb_k > fa_k else a} is "
                       f"more robust ({100 * max(fa_k, fb_k):.1f}% vs {100 * min(fa_k, fb_k):.1f}%), AutoAttack says "
                       f"{aa_better} ({100 * max(aa_a, aa_b):.1f}% vs {100 * min(aa_a, aa_b):.1f}%).")
    return out


def robustness(ctx: Context) -> Section:
    from robustops.attacks import CWL2, PGD, DeepFool, robust_accuracy_curve

    st = ctx.settings
    sec = Section("robustness", "1. Robustness",
                  "Accuracy on clean test images and under attacks of growing strength: the higher the "
                  "curve and the larger the perturbation an attack needs (DeepFool, C&W), the more robust "
                  "the model; FGSM and PGD give upper bounds on robust accuracy, AutoAttack the tightest "
                  "one, and a large gap between them is a warning sign (gradient masking).")
    x, y = ctx.eval_xy()
    n = x.shape[0]
    aa_cls, aa_why = _autoattack_class()
    eps = st.attack_eps
    results = {}
    curves, pgd_pts, aa_pts = {}, {}, {}
    for i, me in enumerate(ctx.models):
        model = me.model
        model.eval()

        def chunk_fn(ci, s, e, model=model):
            xb, yb = x[s:e], y[s:e]
            out = {}
            t0 = time.perf_counter()
            with torch.no_grad():
                out["clean"] = model(xb).argmax(1) == yb
            out["chunk_t_clean"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            acc = robust_accuracy_curve(model, (xb, yb), st.fgsm_eps, batch_size=e - s)
            out["chunk_fgsm"] = [round(float(a) * (e - s)) for a in acc]
            out["chunk_t_fgsm"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            xa = PGD(model, eps=eps, alpha=eps / 4, steps=st.pgd_steps, random_start=True,
                     seed=ctx.seed + ci)(xb, yb)
            with torch.no_grad():
                out["pgd"] = model(xa).argmax(1) == yb
            out["chunk_t_pgd"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            df = DeepFool(model, steps=st.deepfool_steps)(xb, yb)
            out["df_l2"] = df.perturbation.flatten(1).norm(dim=1)
            out["df_ratio"] = df.ratio
            out["df_success"] = df.success
            out["chunk_t_deepfool"] = time.perf_counter() - t0
            return out

        r = map_chunks(chunk_fn, n, st.chunk, desc=f"attacks {me.label}")
        clean_acc = float(r["clean"].double().mean())
        fgsm_counts = np.sum(np.asarray(r["chunk_fgsm"], dtype=np.int64), axis=0)
        fgsm_acc = (fgsm_counts / n).tolist()
        pgd_acc = float(r["pgd"].double().mean())
        ok = r["clean"] & r["df_success"]
        df_med = float(r["df_l2"][ok].median()) if ok.any() else float("nan")
        rho = float(r["df_ratio"].double().mean())
        times = {k[8:]: float(sum(r[k])) for k in r if k.startswith("chunk_t_")}
        counts = {"clean": n, "fgsm": n, "pgd": n, "deepfool": n}

        # C&W-L2 on the first n_cw points
        def cw_fn(ci, s, e, model=model):
            t0 = time.perf_counter()
            atk = CWL2(model, c=1.0, steps=st.cw_steps, lr=0.05, binary_search_steps=st.cw_search,
                       seed=ctx.seed + ci)
            atk(x[s:e], y[s:e])
            res = atk.last_result
            return {"l2": res.l2, "success": res.success, "chunk_t": time.perf_counter() - t0}

        rc = map_chunks(cw_fn, st.n_cw, st.chunk, desc=f"C&W {me.label}")
        cw_ok = rc["success"] & r["clean"][:st.n_cw]
        cw_mean = float(rc["l2"][cw_ok].double().mean()) if cw_ok.any() else float("nan")
        cw_rate = float(rc["success"][r["clean"][:st.n_cw]].double().mean()) if r["clean"][:st.n_cw].any() else float("nan")
        times["cw_l2"] = float(sum(rc["chunk_t"]))
        counts["cw_l2"] = st.n_cw

        aa = None
        if aa_cls is not None:
            try:
                aa = _run_autoattack(aa_cls, model, x[:st.n_aa], y[:st.n_aa], eps, ctx.seed, st.chunk, st.quick)
                times["autoattack"] = aa["seconds"]
                counts["autoattack"] = st.n_aa
                aa_pts[me.label] = (eps, aa["robust_accuracy"])
            except Exception as e:  # report, do not hide
                aa = {"error": f"{type(e).__name__}: {e}"}
        results[me.label] = {
            "clean_accuracy": clean_acc, "fgsm": {"eps": st.fgsm_eps, "accuracy": fgsm_acc},
            "pgd": {"eps": eps, "alpha": eps / 4, "steps": st.pgd_steps, "random_start": True, "accuracy": pgd_acc},
            "deepfool": {"median_l2": df_med, "rho_adv": rho, "success_rate": float(r["df_success"][r["clean"]].double().mean()) if r["clean"].any() else float("nan"),
                         "steps": st.deepfool_steps},
            "cw_l2": {"mean_l2": cw_mean, "success_rate": cw_rate, "n": st.n_cw, "steps": st.cw_steps,
                      "binary_search_steps": st.cw_search},
            "autoattack": aa if aa is not None else {"missing": aa_why},
            "seconds": times, "points": counts,
        }
        curves[me.label] = (st.fgsm_eps, fgsm_acc)
        pgd_pts[me.label] = (eps, pgd_acc)
        k_eps = min(range(len(st.fgsm_eps)), key=lambda j: abs(st.fgsm_eps[j] - eps))
        sec.put(me.label, "clean accuracy", _pct(clean_acc))
        sec.put(me.label, f"FGSM acc. @ {st.fgsm_eps[k_eps]:g}", _pct(fgsm_acc[k_eps]))
        sec.put(me.label, f"PGD-{st.pgd_steps} acc. @ {eps:g}", _pct(pgd_acc))
        sec.put(me.label, "DeepFool median L2 / rho_adv", f"{_num(df_med)} / {_num(rho)}")
        sec.put(me.label, "C&W-L2 mean L2", _num(cw_mean))
        sec.put(me.label, f"AutoAttack acc. @ {eps:g}",
                _pct(aa["robust_accuracy"]) if aa and "robust_accuracy" in aa else ("failed" if aa else "missing"))

    labels = [m.label for m in ctx.models]
    headers = ["metric"] + labels
    rows = [["clean accuracy"] + [_pct(results[l]["clean_accuracy"]) for l in labels]]
    for j, e in enumerate(st.fgsm_eps):
        if e == 0:
            continue
        rows.append([f"FGSM accuracy, eps {e:g}"] + [_pct(results[l]["fgsm"]["accuracy"][j]) for l in labels])
    rows.append([f"PGD accuracy, eps {eps:g}, {st.pgd_steps} steps, random start"] +
                [_pct(results[l]["pgd"]["accuracy"]) for l in labels])
    rows.append([f"AutoAttack ({'APGD-CE + APGD-T, quick' if st.quick else 'standard'}) accuracy, eps {eps:g}, "
                 f"first {st.n_aa} points"] +
                [_pct(results[l]["autoattack"].get("robust_accuracy")) if "robust_accuracy" in results[l]["autoattack"]
                 else ("failed" if "error" in results[l]["autoattack"] else "not available") for l in labels])
    rows.append(["DeepFool median L2 perturbation"] + [_num(results[l]["deepfool"]["median_l2"]) for l in labels])
    rows.append(["DeepFool rho_adv (mean ||r|| / ||x||)"] + [_num(results[l]["deepfool"]["rho_adv"], "{:.4f}") for l in labels])
    rows.append([f"C&W-L2 mean L2 (successful, first {st.n_cw} points)"] + [_num(results[l]["cw_l2"]["mean_l2"]) for l in labels])
    rows.append(["C&W-L2 success rate"] + [_pct(results[l]["cw_l2"]["success_rate"]) for l in labels])
    sec.table(headers, rows, f"{n} evaluation images of {ctx.bundle.name}; pixels in [0, 1], L-inf budgets in pixel units.")
    for line in _observations(results, labels, st, eps):
        sec.finding(line)
    path = ctx.fig("robustness_curves.png", figures.fgsm_curves, curves, pgd=pgd_pts, autoattack=aa_pts or None)
    sec.figure(path, "FGSM accuracy for each eps (the whole curve from one input gradient per batch, fused "
                     "fgsm_step op); squares: PGD, crosses: AutoAttack at the attack budget.")
    # AutoAttack status and flags
    if aa_cls is None:
        sec.note(f"AutoAttack: not available ({aa_why}); the table says so.")
    else:
        for l in labels:
            a = results[l]["autoattack"]
            if "error" in a:
                sec.note(f"AutoAttack failed on {l}: {a['error']}")
            else:
                steps = a.get("accuracy_after") or {}
                ts = a.get("attack_seconds") or {}
                if steps:
                    sec.text(f"AutoAttack ({a['version']}) on {l}, robust accuracy after each attack: " +
                             ", ".join(f"{k} {_pct(v)} ({_secs(ts[k]) if k in ts else 'not run: no point left'})"
                                       for k, v in steps.items())
                             + ".")
                if a.get("flags"):
                    sec.note(f"AutoAttack integrity flags on {l}: " + "; ".join(a["flags"]))
                else:
                    sec.text(f"AutoAttack raised no integrity flag on {l} (no zero gradients, no sign of gradient "
                             f"masking).")
    # timing table
    trow = []
    names = [("clean", "clean forward"), ("fgsm", f"FGSM curve ({len(st.fgsm_eps)} eps, one gradient)"),
             ("pgd", f"PGD ({st.pgd_steps} steps)"), ("deepfool", f"DeepFool (<= {st.deepfool_steps} steps)"),
             ("cw_l2", f"C&W-L2 ({st.cw_search} x {st.cw_steps} steps)"),
             ("autoattack", "AutoAttack " + ("(APGD-CE + APGD-T)" if st.quick else "standard"))]
    for key, name in names:
        row = [name]
        for l in labels:
            t = results[l]["seconds"].get(key)
            c = results[l]["points"].get(key)
            row.append("n/a" if t is None else f"{_secs(t)} ({1e3 * t / max(1, c):.2f} ms/image, {c} images)")
        trow.append(row)
    sec.table(["attack"] + labels, trow, "Attack times in this run (CPU seconds summed over shards).")
    sec.data = {"settings": {"n_eval": n, "attack_eps": eps, "fgsm_eps": st.fgsm_eps}, "models": results}
    return sec


# ----------------------------------------------------------------------------------------------
# 2. Fragile kernels
# ----------------------------------------------------------------------------------------------

def fragile(ctx: Context) -> Section:
    from robustops.fragile import adversarial_targeting, apply_filter, fragile_split, kernel_dropout
    from robustops.fragile._common import resolve_layer

    st = ctx.settings
    sec = Section("fragile", "2. Fragile kernels of the first convolution",
                  "Each kernel of the first conv layer is removed in turn: kernels whose removal drops accuracy "
                  "below the mean line are fragile (S), the others null (S'); the targeting curve shows how often "
                  "an FGSM perturbation hits S harder than S' (above 50%: attacks aim at the fragile kernels), and "
                  "the last table shows what SVD-filtering S' and amplifying S does to clean and FGSM accuracy.")
    x, y = ctx.eval_xy()
    # held-out sample for the noise-level search: training images (never the evaluation set)
    nh = min(ctx.bundle.x_train.shape[0], 200 if not st.quick else 64)
    held = (ctx.bundle.x_train[-nh:].to(ctx.device), ctx.bundle.y_train[-nh:].to(ctx.device))
    fgsm_eps = st.attack_eps
    panels, tlines, results = {}, {}, {}
    rows_split, rows_filter, notes_filter = [], [], []
    for me in ctx.models:
        model = me.model
        try:
            name, conv = resolve_layer(model, None)
        except Exception as e:
            results[me.label] = {"error": str(e)}
            sec.note(f"{me.label}: {e}")
            continue
        t0 = time.perf_counter()
        res = kernel_dropout(model, name, (x, y), adversarial=fgsm_eps)
        t_drop = time.perf_counter() - t0
        split = fragile_split(res)
        tgt = adversarial_targeting(model, name, (x, y), st.frag_eps, split)
        t0 = time.perf_counter()
        _, rep = apply_filter(model, name, (x, y), split=split, eps_noise="search", held_out=held,
                              fgsm_eps=fgsm_eps)
        t_filter = time.perf_counter() - t0
        panels[me.label] = {"clean": res.clean_accuracy.tolist(), "adv": res.adversarial_accuracy.tolist(),
                            "adv_eps": fgsm_eps, "baseline": res.baseline_accuracy,
                            "adv_baseline": res.baseline_adversarial_accuracy,
                            "fragile": split.fragile.tolist(), "null": split.null.tolist(), "layer": name}
        tlines[me.label] = (tgt.eps.tolist(), tgt.percentage.tolist())
        results[me.label] = {
            "layer": name, "kernels": int(conv.out_channels), "method": res.method,
            "baseline_accuracy": res.baseline_accuracy, "accuracy_without_kernel": res.clean_accuracy.tolist(),
            "fgsm_eps": fgsm_eps, "fgsm_accuracy_without_kernel": res.adversarial_accuracy.tolist(),
            "baseline_fgsm_accuracy": res.baseline_adversarial_accuracy,
            "fragile": split.fragile.tolist(), "null": split.null.tolist(), "threshold": split.threshold,
            "targeting": {"eps": tgt.eps.tolist(), "percentage": tgt.percentage.tolist()},
            "filter": {"eps_noise": rep.eps_noise, "tau": rep.tau, "alpha": rep.alpha, "mode": rep.mode,
                       "clean_before": rep.clean_accuracy_before, "clean_after": rep.clean_accuracy_after,
                       "fgsm_before": rep.adversarial_accuracy_before, "fgsm_after": rep.adversarial_accuracy_after,
                       "fgsm_after_transfer": rep.adversarial_accuracy_after_transfer},
            "seconds": {"kernel_dropout": t_drop, "filter": t_filter},
        }
        worst = int(torch.argmin(res.clean_accuracy))
        rows_split.append([me.label, f"{name} ({conv.out_channels})", f"{split.fragile.numel()} / {split.null.numel()}",
                           _pct(res.baseline_accuracy), f"{_pct(float(res.clean_accuracy[worst]))} (kernel {worst})",
                           _pct(split.threshold) if split.metric.endswith("accuracy") else _num(split.threshold),
                           _secs(t_drop)])
        rows_filter.append([me.label, _pct(rep.clean_accuracy_before), _pct(rep.clean_accuracy_after),
                            _pct(rep.adversarial_accuracy_before), _pct(rep.adversarial_accuracy_after),
                            _pct(rep.adversarial_accuracy_after_transfer),
                            f"{rep.eps_noise:.3g}" if rep.eps_noise is not None else "n/a", f"{rep.alpha:.3f}"])
        if (rep.clean_accuracy_before == rep.clean_accuracy_after
                and rep.adversarial_accuracy_before == rep.adversarial_accuracy_after):
            notes_filter.append(f"{me.label}: the SVD filter left clean and FGSM accuracy unchanged (threshold tau "
                                f"{rep.tau:.3g}, amplification {rep.alpha:.3f}): on this layer and data the defence has no measurable effect.")
        elif rep.adversarial_accuracy_after > rep.adversarial_accuracy_before:
            notes_filter.append(f"{me.label}: the SVD filter raised FGSM accuracy by "
                                f"{100 * (rep.adversarial_accuracy_after - rep.adversarial_accuracy_before):.1f} points "
                                f"at a clean-accuracy cost of "
                                f"{100 * (rep.clean_accuracy_before - rep.clean_accuracy_after):.1f} points.")
        else:
            notes_filter.append(f"{me.label}: the SVD filter did not help against white-box FGSM "
                                f"({_pct(rep.adversarial_accuracy_before)} -> {_pct(rep.adversarial_accuracy_after)}).")
        sec.put(me.label, "fragile S / null S'", f"{split.fragile.numel()} / {split.null.numel()}")
        sec.put(me.label, f"SVD filter: FGSM acc. @ {fgsm_eps:g}",
                f"{_pct(rep.adversarial_accuracy_before)} -> {_pct(rep.adversarial_accuracy_after)}")
    sec.table(["model", "layer (kernels)", "|S| / |S'|", "accuracy, nothing removed", "worst single removal",
               "split line (mean)", "time"], rows_split,
              f"One-kernel dropout on {x.shape[0]} evaluation images, exact and batched (compiled kernel_dropout_eval op).")
    path = ctx.fig("fragile_dropout.png", figures.dropout_panels, panels) if panels else None
    sec.figure(path, f"Accuracy with each kernel removed (circles: fragile S, stars: null S'), and under a fixed "
                     f"FGSM set (eps {fgsm_eps:g}) crafted on the intact model.")
    path = ctx.fig("fragile_targeting.png", figures.targeting_lines, tlines) if tlines else None
    sec.figure(path, "Share of examples whose FGSM perturbation moves the S kernels' responses more than the S' "
                     "kernels' (Algorithm 1).")
    sec.table(["model", "clean before", "clean after", f"FGSM @ {fgsm_eps:g} before", "after (white-box)",
               "after (transfer)", "noise level", "amplification alpha"], rows_filter,
              "SVD filter of S' (clamp, threshold from a noise level searched on held-out training images) "
              "and amplification of S.")
    for line in notes_filter:
        sec.finding(line)
    sec.data = {"models": results}
    return sec


# ----------------------------------------------------------------------------------------------
# 3. Detection
# ----------------------------------------------------------------------------------------------

def _fgsm_sets(model, x, y, eps, chunk, desc):
    """FGSM examples of every point (sharded), with the clean and adversarial correctness."""
    from robustops.attacks import fgsm

    def fn(ci, s, e):
        xb, yb = x[s:e], y[s:e]
        xa = fgsm(model, xb, yb, eps)
        with torch.no_grad():
            return {"x_adv": xa, "clean_ok": model(xb).argmax(1) == yb, "adv_ok": model(xa).argmax(1) == yb}

    return map_chunks(fn, x.shape[0], chunk, desc=desc)


def _scores(det, x, chunk, desc):
    r = map_chunks(lambda ci, s, e: {"s": torch.as_tensor(det.score(x[s:e])).double().reshape(-1)},
                   x.shape[0], chunk, desc=desc)
    return r["s"]


def _can_shard_features(det_mod, det) -> bool:
    return all(hasattr(det_mod, k) for k in ("neuron_features", "extract")) and hasattr(det, "fit_features") \
        and hasattr(det, "layer_names") and hasattr(det, "normalize")


def _fit_sharded(det_mod, det, model, x_clean, x_adv, chunk):
    """The relevant-neuron detector's fit with its neuron features (one forward per image, the
    expensive part) computed in chunks spread over the torchrun ranks; the mu-Lasso and the forest
    then run on the gathered features, identically on every rank."""
    probe = det_mod.extract(model, x_clean[:1], det.layer_names, det.normalize, name="x_clean")

    def fn(ci, s, e):
        fc, lc = det_mod.neuron_features(model, x_clean[s:e], det.layer_names, det.normalize, return_logits=True)
        fa, la = det_mod.neuron_features(model, x_adv[s:e], det.layer_names, det.normalize, return_logits=True)
        return {"fc": fc.float(), "pc": lc.argmax(1), "fa": fa.float(), "pa": la.argmax(1)}

    r = map_chunks(fn, x_clean.shape[0], chunk, desc="detector features")
    num_classes = getattr(probe, "num_classes", None) or int(model(x_clean[:1]).shape[1])
    det.fit_features(r["fc"], r["pc"], r["fa"], r["pa"], num_classes=num_classes, only_successful=True,
                     layer_sizes=getattr(probe, "sizes", None), sample_shape=getattr(probe, "sample_shape", None))
    return det


def detection(ctx: Context) -> Section:
    st = ctx.settings
    sec = Section("detection", "3. Detecting adversarial inputs",
                  "Each detector is trained to tell clean test images from FGSM examples and is scored on images it "
                  "never saw: accuracy on a balanced set, true-positive rate (attacks caught), false-positive rate "
                  "(clean images flagged) and ROC-AUC (1.0 = perfect, 0.5 = chance); curves nearer the top-left "
                  "corner are better.")
    det_mod, why = _optional("robustops.detect")
    names = ("RelevantNeuronDetector", "FeatureSqueezingDetector", "NICDetector", "evaluate_detector")
    if det_mod is not None and not all(hasattr(det_mod, k) for k in names):
        missing = [k for k in names if not hasattr(det_mod, k)]
        det_mod, why = None, f"robustops.detect in this installation does not provide {', '.join(missing)} yet"
    elif det_mod is None:
        why = f"robustops.detect does not import in this installation ({why})"
    if det_mod is None:
        sec.status, sec.message = "missing", f"{why}; this section needs it."
        for me in ctx.models:
            sec.put(me.label, "detector ROC-AUC (ours / FS / NIC)", "missing")
        sec.data = {"missing": why}
        return sec
    from sklearn.metrics import roc_auc_score, roc_curve

    ntr = min(st.n_det_train, ctx.bundle.x_train.shape[0])
    x_tr, y_tr = ctx.bundle.x_train[:ntr].to(ctx.device), ctx.bundle.y_train[:ntr].to(ctx.device)
    x_te, y_te = ctx.eval_xy()
    eps = st.det_eps
    results, rocs, rows = {}, {}, []
    for me in ctx.models:
        model = me.model
        tr = _fgsm_sets(model, x_tr, y_tr, eps, st.chunk, f"detector train set {me.label}")
        te = _fgsm_sets(model, x_te, y_te, eps, st.chunk, f"detector test set {me.label}")
        # training: the correctly classified images and their FGSM examples, paired (the detectors keep
        # the pairs whose attack succeeded); test: correctly classified images vs successful attacks
        ok_tr = tr["clean_ok"]
        xc_tr, xa_tr = x_tr[ok_tr.to(x_tr.device)], tr["x_adv"][ok_tr].to(ctx.device)
        n_adv_tr = int((ok_tr & ~tr["adv_ok"]).sum())
        m_te = te["clean_ok"] & ~te["adv_ok"]
        xc_te, xa_te = x_te[te["clean_ok"].to(x_te.device)], te["x_adv"][m_te].to(ctx.device)
        info = {"fgsm_eps": eps, "n_train_clean": int(xc_tr.shape[0]), "n_train_adv": n_adv_tr,
                "n_test_clean": int(xc_te.shape[0]), "n_test_adv": int(xa_te.shape[0]), "detectors": {}}
        if n_adv_tr < 2 or xa_te.shape[0] < 2:
            sec.note(f"{me.label}: FGSM eps {eps:g} succeeded on too few images ({n_adv_tr} / "
                     f"{xa_te.shape[0]}) to train and test detectors.")
            results[me.label] = info
            continue
        dets = [("relevant neurons (mu=10)", lambda: det_mod.RelevantNeuronDetector(
                    model, mu=10, variant="shared", use_label=True, n_estimators=st.det_trees, seed=ctx.seed)),
                ("Feature Squeezing", lambda: det_mod.FeatureSqueezingDetector(model)),
                ("NIC", lambda: det_mod.NICDetector(model))]
        rocs[me.label] = {}
        aucs = []
        for dname, make in dets:
            try:
                t0 = time.perf_counter()
                det = make()
                if dname.startswith("relevant") and _can_shard_features(det_mod, det):
                    _fit_sharded(det_mod, det, model, xc_tr, xa_tr, st.chunk)
                else:
                    det.fit(xc_tr, xa_tr)
                t_fit = time.perf_counter() - t0
                t0 = time.perf_counter()
                ev = det_mod.evaluate_detector(det, xc_te, xa_te)
                sc = torch.cat([_scores(det, xc_te, st.chunk, f"{dname} scores"),
                                _scores(det, xa_te, st.chunk, f"{dname} scores")]).numpy()
                t_eval = time.perf_counter() - t0
                lab = np.r_[np.zeros(xc_te.shape[0]), np.ones(xa_te.shape[0])]
                fpr, tpr, _ = roc_curve(lab, sc)
                auc = float(roc_auc_score(lab, sc))
                rocs[me.label][dname] = (fpr, tpr, auc)
                ev = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) or torch.is_tensor(v) else v)
                      for k, v in dict(ev).items()}
                ev.update(roc_auc_from_scores=auc, fit_seconds=t_fit, eval_seconds=t_eval)
                extra = ""
                rel = getattr(det, "relevant", None)
                if isinstance(rel, dict) and rel:
                    sizes = []
                    for v in rel.values():
                        s = v.get("shared") if isinstance(v, dict) else v
                        try:
                            sizes.append(len(s))
                        except TypeError:
                            pass
                    if sizes:
                        ev["relevant_per_class_mean"] = float(np.mean(sizes))
                        extra = f"{np.mean(sizes):.0f} neurons/class"
                info["detectors"][dname] = ev
                rows.append([me.label, dname, _pct(ev.get("accuracy")), _pct(ev.get("tpr")), _pct(ev.get("fpr")),
                             _num(ev.get("roc_auc", auc)), extra, _secs(t_fit)])
                aucs.append(_num(auc))
            except Exception as e:
                info["detectors"][dname] = {"error": f"{type(e).__name__}: {e}"}
                rows.append([me.label, dname, "failed", "", "", "", f"{type(e).__name__}: {str(e)[:80]}", ""])
                aucs.append("failed")
        results[me.label] = info
        sec.put(me.label, "detector ROC-AUC (ours / FS / NIC)", " / ".join(aucs))
        got = {k: v["roc_auc_from_scores"] for k, v in info["detectors"].items() if "roc_auc_from_scores" in v}
        if got:
            best = max(got, key=got.get)
            others = ", ".join(f"{k} {v:.3f}" for k, v in got.items() if k != best)
            sec.finding(f"{me.label}: {best} separates clean from FGSM images best (ROC-AUC {got[best]:.3f}"
                        f"{'; ' + others if others else ''}).")
    sec.table(["model", "detector", "accuracy", "TPR", "FPR", "ROC-AUC", "notes", "fit time"], rows,
              f"FGSM eps {eps:g}; trained on the first {ntr} training images (those classified correctly) and "
              f"their successful FGSM examples; tested on the evaluation images (correctly classified ones vs "
              f"successful FGSM examples). TPR/FPR at each detector's own threshold.")
    path = ctx.fig("detection_roc.png", figures.roc_curves, rocs) if any(rocs.values()) else None
    sec.figure(path, "ROC curves of the three detectors on the held-out images.")
    sec.data = {"models": results}
    return sec


# ----------------------------------------------------------------------------------------------
# 4. Explanations
# ----------------------------------------------------------------------------------------------

def _last_conv(model: nn.Module) -> Optional[str]:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            name = n
    return name


def _channel_change(model, layer: str, xc, xa) -> torch.Tensor:
    """Per example, the channel of ``layer`` whose mean response changes most under the attack."""
    mod = model.get_submodule(layer)
    acts = []
    h = mod.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
    try:
        with torch.no_grad():
            model(xc)
            model(xa)
    finally:
        h.remove()
    diff = (acts[0].mean((2, 3)) - acts[1].mean((2, 3))).abs()
    return diff.argmax(1)


def _to_map(r: torch.Tensor) -> np.ndarray:
    r = torch.as_tensor(r).detach().double()
    if r.dim() == 3:
        r = r.sum(0)
    return r.cpu().numpy()


def explanations(ctx: Context) -> Section:
    st = ctx.settings
    sec = Section("explanations", "4. Explanations: what the attack changes",
                  "Heatmaps show which pixels drive the prediction (LRP: red for evidence for the predicted class, "
                  "blue against; Grad-CAM of the single neuron the attack moves most: brighter = more influence) on a "
                  "clean image and on its adversarial twin; in the map of LRP signatures each dot is one image, and "
                  "adversarial images that land among another class's clean images are the ones the model is fooled by.")
    xai, why = _optional("robustops.xai")
    need = ("lrp", "gradcam", "lrp_signatures", "project")
    if xai is not None and not all(hasattr(xai, k) for k in need):
        missing = [k for k in need if not hasattr(xai, k)]
        xai, why = None, f"robustops.xai in this installation does not provide {', '.join(missing)} yet"
    elif xai is None:
        why = f"robustops.xai does not import in this installation ({why})"
    if xai is None:
        sec.status, sec.message = "missing", f"{why}; this section needs it."
        sec.data = {"missing": why}
        return sec
    from robustops.attacks import fgsm

    x, y = ctx.eval_xy()
    eps = st.det_eps
    umap_ok = _optional("umap")[0] is not None
    method = "umap" if umap_ok and not st.quick else "pca"
    if not umap_ok:
        sec.note("umap-learn is not installed (the [xai] extra): the signature map below uses PCA instead.")
    elif st.quick:
        sec.note("Quick settings: the signature map uses PCA (UMAP's first call compiles for tens of seconds).")
    panels, results = {}, {}
    for me in ctx.models:
        model = me.model
        info: Dict[str, object] = {"fgsm_eps": eps}
        # local view: a few images the attack fools
        xa = fgsm(model, x, y, eps)
        with torch.no_grad():
            pc, pa = model(x).argmax(1), model(xa).argmax(1)
        fooled = ((pc == y) & (pa != y)).nonzero().squeeze(1)[:st.n_heat]
        layer = _last_conv(model)
        if fooled.numel() > 0:
            xc_s, xa_s = x[fooled], xa[fooled]
            t0 = time.perf_counter()
            r_c = xai.lrp(model, xc_s, target=pc[fooled], composite="preset_a_flat")
            r_a = xai.lrp(model, xa_s, target=pa[fooled], composite="preset_a_flat")
            rows = []
            cams = None
            if layer is not None:
                ch = _channel_change(model, layer, xc_s, xa_s)
                cams = []
                for j in range(fooled.numel()):
                    k = [int(ch[j])]
                    cc = xai.gradcam(model, xc_s[j:j + 1], layer, target=pc[fooled][j:j + 1], channels=k)
                    ca = xai.gradcam(model, xa_s[j:j + 1], layer, target=pa[fooled][j:j + 1], channels=k)
                    cams.append((int(ch[j]), _to_map(torch.as_tensor(cc)[0]), _to_map(torch.as_tensor(ca)[0])))
            info["heatmap_seconds"] = time.perf_counter() - t0
            for j in range(fooled.numel()):
                row = {"caption": f"true {int(y[fooled][j])}: {int(pc[fooled][j])} -> {int(pa[fooled][j])}",
                       "img:c": xc_s[j].cpu().numpy(), "lrp:c": _to_map(r_c[j]),
                       "img:a": xa_s[j].cpu().numpy(), "lrp:a": _to_map(r_a[j])}
                if cams is not None:
                    row["cam:c"], row["cam:a"] = cams[j][1], cams[j][2]
                rows.append(row)
            cols = [("img:c", "clean", False), ("lrp:c", "LRP clean", True), ("img:a", "adversarial", False),
                    ("lrp:a", "LRP adversarial", True)]
            if cams is not None:
                cols += [("cam:c", f"Grad-CAM neuron\n({layer}) clean", False),
                         ("cam:a", "Grad-CAM neuron\nadversarial", False)]
                info["gradcam_layer"] = layer
                info["gradcam_channels"] = [c[0] for c in cams]
            safe = "".join(ch if ch.isalnum() else "_" for ch in me.label)
            path = ctx.fig(f"explain_heatmaps_{safe}.png", figures.heatmap_grid, rows, cols,
                           title=f"{me.label}: FGSM eps {eps:g}, row label = true: clean -> adversarial prediction")
            sec.figure(path, f"{me.label}: LRP (preset A flat) and single-neuron Grad-CAM, clean vs adversarial; "
                             f"each clean/adversarial pair shares one colour scale.")
        else:
            sec.note(f"{me.label}: FGSM eps {eps:g} fooled none of the evaluation images; no heatmaps to show.")
        info["heatmap_examples"] = int(fooled.numel())
        # global view: LRP signatures of clean and attacked images, sharded
        ns = st.n_sig
        xs, ys = x[:ns], y[:ns]

        def sig_fn(ci, s, e, model=model):
            xb, yb = xs[s:e], ys[s:e]
            xab = fgsm(model, xb, yb, eps)
            with torch.no_grad():
                ok = model(xab).argmax(1) == yb
                pred = model(xab).argmax(1)
            sc = torch.as_tensor(xai.lrp_signatures(model, xb)).reshape(e - s, -1)
            sa = torch.as_tensor(xai.lrp_signatures(model, xab)).reshape(e - s, -1)
            return {"sig_c": sc, "sig_a": sa, "adv_ok": ok, "adv_pred": pred}

        t0 = time.perf_counter()
        r = map_chunks(sig_fn, ns, st.chunk, desc=f"LRP signatures {me.label}")
        sig = torch.cat([r["sig_c"], r["sig_a"]]).double()
        kind = torch.cat([torch.zeros(ns, dtype=torch.long), torch.where(r["adv_ok"], 2, 1)])
        cls = torch.cat([ys.cpu(), ys.cpu()])
        t_sig = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:  # spread the clusters so that clean and attacked points stay visible
            emb = xai.project(sig, method=method, seed=ctx.seed, **({"min_dist": 0.5} if method == "umap" else {}))
        except TypeError:
            emb = xai.project(sig, method=method, seed=ctx.seed)
        emb = torch.as_tensor(emb).double()
        t_proj = time.perf_counter() - t0
        # where do successful adversarial signatures land? nearest clean signature (Euclidean, full D)
        fooled_m = ~r["adv_ok"]
        if fooled_m.any():
            d = torch.cdist(r["sig_a"][fooled_m].double(), r["sig_c"].double())
            near = ys.cpu()[d.argmin(1)]
            frac = float((near == r["adv_pred"][fooled_m]).double().mean())
            info["fooled_nearest_clean_is_predicted_class"] = frac
            sec.finding(f"{me.label}: {100 * frac:.0f}% of the {int(fooled_m.sum())} successful FGSM examples have an LRP "
                        f"signature whose nearest clean signature belongs to the class the model wrongly predicts"
                        + (": to the model, the attacked image is explained like an image of that class."
                           if frac >= 0.5 else "; the others stay nearer clean images of another class."))
        panels[me.label] = {"emb": emb.numpy(), "cls": cls.numpy(), "kind": kind.numpy(), "method": method.upper()}
        info.update(signatures=ns * 2, signature_dim=int(sig.shape[1]), projection=method,
                    attack_success_rate=float((~r["adv_ok"]).double().mean()), signature_seconds=t_sig,
                    projection_seconds=t_proj)
        results[me.label] = info
        sec.put(me.label, "explanations", f"{info['heatmap_examples']} heatmaps, {ns * 2} signatures ({method})")
    path = ctx.fig("explain_signatures.png", figures.embedding, panels) if panels else None
    sec.figure(path, f"{method.upper()} of the LRP signatures (relevance of the last layer's inputs) of clean images and "
                     f"their FGSM (eps {eps:g}) examples.")
    sec.data = {"models": results}
    return sec


# ----------------------------------------------------------------------------------------------
# 5. Speed
# ----------------------------------------------------------------------------------------------

def speed(ctx: Context) -> Section:
    from .timing import machine_load, speed_records

    sec = Section("speed", "5. Speed of the compiled ops",
                  "Each compiled op is timed against the eager PyTorch code it replaces, on this run's model and "
                  "images, in this process and interleaved so that machine load hits both alike; a speed-up above 1x "
                  "means the compiled path is faster (results are checked equal before timing).")
    if not is_main():
        sec.status = "skipped"
        return sec
    x, y = ctx.eval_xy()
    compact = next((m.model for m in ctx.models if "CCN" in m.label), None)
    load_before = machine_load()
    recs = speed_records(ctx.models[0].model, x, y, compact_model=compact, quick=ctx.settings.quick)
    load_after = machine_load()
    rows = [[r["op"], r["shape"], r["impl"], _secs(r["median_s"]), r["reference"], _secs(r["reference_median_s"]),
             f"{r['speedup']:.2f}x"] for r in recs]
    sec.table(["op", "shape", "compiled path", "time", "eager reference", "time", "speed-up"], rows,
              f"Median per call; {torch.get_num_threads()} threads; load average before/after: {load_before} / "
              f"{load_after}.")
    cpus = os.cpu_count() or 1
    if load_before and max(load_before[0], (load_after or [0])[0]) > cpus:
        sec.note(f"The machine was busy during this run (load average {max(load_before[0], (load_after or [0])[0]):.1f} "
                 f"on {cpus} CPUs): other processes slow both sides unevenly, so these ratios are noisy. "
                 f"Re-run `robustops bench` on an idle machine for figures to quote.")
    path = ctx.fig("speed.png", figures.speedups, recs)
    sec.figure(path, "Speed-up of each compiled path over its eager reference in this run.")
    for r in recs:
        sec.put("all models" if len(ctx.models) > 1 else ctx.models[0].label, f"speed-up {r['op']}", f"{r['speedup']:.2f}x")
    sec.data = {"records": recs, "threads": torch.get_num_threads(), "load_before": load_before,
                "load_after": load_after}
    return sec


SECTIONS = {"robustness": robustness, "fragile": fragile, "detection": detection, "explanations": explanations,
            "speed": speed}


def run_section(key: str, ctx: Context, debug: bool = False) -> Section:
    """Run one section; an exception becomes a "failed" section with the error (re-raised with debug)."""
    t0 = time.perf_counter()
    try:
        sec = SECTIONS[key](ctx)
    except Exception as e:
        if debug:
            raise
        titles = {"robustness": "1. Robustness", "fragile": "2. Fragile kernels of the first convolution",
                  "detection": "3. Detecting adversarial inputs",
                  "explanations": "4. Explanations: what the attack changes", "speed": "5. Speed of the compiled ops"}
        sec = Section(key, titles[key], "", status="failed",
                      message=f"this section failed: {type(e).__name__}: {e}")
        sec.data = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    sec.seconds = time.perf_counter() - t0
    return sec
