"""Detection: RelevantNeuronDetector.predict overhead over a plain forward; mu-Lasso vs scikit-learn.

* ``det.predict(x)`` vs ``model(x)`` (under ``torch.no_grad``) on the same batch: Papernot's
  MNIST net, 256 digits upsampled to 28x28, forest of 1000 trees (the default), mu=10 (shared, with label).
  ``predict`` hooks only the layers that hold a selected neuron (``normalize="l2"`` normalises
  each layer on its own). Broken down into: the forward with hooks on every layer that do no
  work (hook dispatch), the forward with every layer's per-channel norms + normalisation
  (``features_and_logits``, what ``predict`` costs when every layer holds a selected neuron),
  and the forest on the selected features (``score_features``: per-tree leaf masks, every
  class in one call of the compiled op, see ``robustops/detect/forest.py``). For reference the
  same forest without the label (all class blocks in every tree), and ``predict`` of a
  ``normalize="sum_l2"`` detector (one L2 norm over all layers: every layer computed). Goal:
  ratio <= 1.10.
* ``mu_lasso`` (spectral projected gradient, all classes at once) on m = 3,000 neurons, N =
  10,000 samples, C = 10 (float32, non-negative unit-norm features like the detector's) vs
  scikit-learn's ``Lasso`` (coordinate descent, Gram precomputed) solving the same problems: the
  penalty ``alpha_j = ||X^T r_j||_inf / N`` of each class is read from the mu-Lasso solution
  (KKT), so both solve the same optimisation problem; the record notes the objective
  difference. Goal: < 5 s on CPU.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from _timing import interleaved as _interleaved  # noqa: E402
from robustops import data, models
from robustops.attacks import FGSM
from robustops.detect import RelevantNeuronDetector, extract, mu_lasso


def _median(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _rec(name, shape, impl, ref_name, med, ref):
    return {"name": name, "shape": shape, "impl": impl, "reference": ref_name, "median_s": med,
            "reference_median_s": ref, "ratio": med / ref, "speedup": ref / med, "device": "cpu",
            "threads": torch.get_num_threads()}


#: the detector's default forest size (RelevantNeuronDetector(n_estimators=1000), the paper's)
TREES = 1000


def bench_predict(quick: bool):
    from robustops._guard import frozen_model
    from robustops.detect import ActivationRecorder
    torch.manual_seed(0)
    x, y = data.as_tensors(data.load("digits", split="train", size=28))
    model = models.papernot_mnist()
    models.train(model, (x[:512], y[:512]), epochs=1, optimizer="adam", lr=1e-3, seed=0)
    model.eval()
    n_fit = 300 if quick else 600
    xa = FGSM(model, eps=0.3)(x[:n_fit], y[:n_fit])
    det = RelevantNeuronDetector(model, mu=10, n_estimators=TREES, seed=0).fit(x[:n_fit], xa)
    # the same relevant sets without the label (every class block, forest on all of them)
    nolabel = RelevantNeuronDetector(model, mu=10, use_label=False, n_estimators=TREES, seed=0)
    c, a = extract(model, x[:n_fit], det.layer_names), extract(model, xa, det.layer_names)
    nolabel.fit_features(c.features, c.predictions, a.features, a.predictions, c.num_classes, layer_sizes=c.sizes,
                         sample_shape=c.sample_shape, relevant=det.relevant)
    # the sparser normalisation (one or two neurons per class at mu=10): every class a table
    sparse = RelevantNeuronDetector(model, mu=10, n_estimators=TREES, seed=0, normalize="sum_l2").fit(x[:n_fit], xa)
    batch = x[n_fit:n_fit + 256]
    reps = 5 if quick else 30

    def forward():
        with torch.no_grad():
            model(batch)

    def hooks_only():                                       # hook dispatch, no reduction work
        with frozen_model(model), torch.no_grad(), ActivationRecorder(model, det.layer_names,
                                                                      reduce=lambda o: o.new_zeros(len(o), 1)):
            model(batch)

    feats, logits = det.features_and_logits(batch)
    preds = logits.argmax(1)
    t = _interleaved({"forward": forward, "predict": lambda: det.predict(batch),
                      "hooks": hooks_only,
                      "features": lambda: det.features_and_logits(batch),
                      "forest": lambda: det.score_features(feats, preds),
                      "forest_nolabel": lambda: nolabel.score_features(feats, preds),
                      "predict_sparse": lambda: sparse.predict(batch)}, reps)
    def tables(d):                                          # how the forest is evaluated, and its table size
        f = d._forest_eval
        return f.form + (f", {f.masks.nbytes() / 1e6:.0f} MB tables" if f.masks is not None else "")
    shape = (f"papernot 256x1x28x28, {det.n_features_} neurons, {int(det._index.numel())} selected in "
             f"{'/'.join(det._read_layers)}, {TREES} trees")
    ref = "model(x) no_grad"
    return [
        _rec("RND.predict overhead", shape, "det.predict(x)", ref, t["predict"], t["forward"]),
        _rec("RND.predict part", shape, "forward+hooks (no reduction)", ref, t["hooks"], t["forward"]),
        _rec("RND.predict part", shape, "forward+hooks+norms+normalize", ref, t["features"], t["forward"]),
        _rec("RND.predict part", shape + f"; {tables(det)}", "forest (with label)", ref,
             t["forest"], t["forward"]),
        _rec("RND no-label forest", shape + f" (all blocks; {tables(nolabel)})", "forest (without label)", ref,
             t["forest_nolabel"], t["forward"]),
        _rec("RND.predict overhead", f"as above, normalize='sum_l2' (every layer computed), "
             f"{int(sparse._index.numel())} selected; " + tables(sparse), "det.predict(x)", ref, t["predict_sparse"],
             t["forward"]),
    ]


def bench_lasso(quick: bool):
    from sklearn.linear_model import Lasso
    n, m, c = (3000, 1000, 10) if quick else (10000, 3000, 10)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=g)
    X = torch.rand(n, m, generator=g) ** 3
    # a few neurons per class respond more to that class (as relevant neurons do)
    for j in range(c):
        cols = torch.arange(j * 5, j * 5 + 5)
        X[(labels == j).nonzero().flatten()[:, None], cols[None, :]] += 0.5
    X = X / X.norm(dim=1, keepdim=True)
    Y = torch.nn.functional.one_hot(labels, c).float()
    reps = 1 if quick else 2
    res = {}

    def ours():
        res["r"] = mu_lasso(X, Y, 10.0, tol=1e-5)

    t_ours = _median(ours, reps)
    r = res["r"]
    W = r.W.double()
    Xd, Yd = X.double(), Y.double()
    alphas = (Xd.T @ (Yd - Xd @ W)).abs().amax(0) / n
    Xn = X.numpy().astype(np.float64)
    coefs = {}

    def sk():
        gram_ = Xn.T @ Xn
        for j in range(c):
            coefs[j] = Lasso(alpha=float(alphas[j]), fit_intercept=False, precompute=gram_, tol=1e-6,
                             max_iter=20000).fit(Xn, Yd[:, j].numpy()).coef_

    try:                                                    # same thread count for numpy's BLAS as for torch
        from threadpoolctl import threadpool_limits
        with threadpool_limits(torch.get_num_threads()):
            t_sk = _median(sk, reps)
    except ImportError:
        t_sk = _median(sk, reps)
    W_sk = torch.from_numpy(np.stack([coefs[j] for j in range(c)], 1))
    f_sk = ((Xd @ W_sk - Yd) ** 2).sum(0)
    f_ours = ((Xd @ W - Yd) ** 2).sum(0)
    rel = float(((f_ours - f_sk) / f_sk).abs().max())
    shape = f"N={n} m={m} C={c} mu=10 ({r.iterations} it, nnz/class {float((W != 0).sum(0).double().mean()):.0f})"
    rec = _rec("mu_lasso", shape, "SPG (auto, float32)", "sklearn Lasso CD x C (Gram, float64)", t_ours, t_sk)
    rec["objective_rel_diff"] = rel
    return [rec]


def run(quick: bool = False):
    return bench_predict(quick) + bench_lasso(quick)
