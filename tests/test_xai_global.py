"""robustops.xai global view (LRP signatures, UMAP / PCA projection), plots, adversarial retraining."""
import sys

import numpy as np
import pytest
import torch

from robustops import data, models, xai
from robustops.attacks import FGSM, fgsm

DT = torch.float64


def test_signature_default_is_relevance_at_the_last_layer_input():
    torch.manual_seed(0)
    model = models.small_cnn().to(DT).eval()
    x = torch.rand(5, 1, 8, 8, dtype=DT)
    sig = xai.lrp_signatures(model, x, composite="preset_a_flat")
    assert sig.shape == (5, 64)
    # epsilon-0.1 LRP on fc2 by hand: R_j = a_j w_cj z_c / (z_c + 0.1 sign z_c)
    with torch.no_grad():
        a = model.act3(model.fc1(model.flatten(model.pool1(model.act2(model.conv2(model.act1(model.conv1(x))))))))
        z = model.fc2(a)
    c = z.argmax(1)
    zc = z.gather(1, c[:, None])[:, 0]
    ref = a * model.fc2.weight[c] * (zc / (zc + 0.1 * zc.sign()))[:, None]
    torch.testing.assert_close(sig, ref.detach(), rtol=1e-10, atol=1e-12)
    # a named layer: the relevance at that layer's input; "input": the flattened heatmap
    r_fc1 = xai.lrp_signatures(model, x, layer="fc1")
    assert r_fc1.shape == (5, model.flatten_features)
    full = xai.relevance_sums(model, x)
    torch.testing.assert_close(r_fc1.sum(1), full["fc1"])
    torch.testing.assert_close(xai.lrp_signatures(model, x, layer="input"), xai.lrp(model, x).flatten(1))


def test_project_pca_matches_sklearn_and_umap_is_seeded():
    from sklearn.decomposition import PCA

    gen = torch.Generator().manual_seed(0)
    sig = torch.cat([torch.randn(30, 80, generator=gen), torch.randn(30, 80, generator=gen) + 4])
    emb = xai.project(sig, method="pca")
    ref = PCA(2, random_state=0).fit_transform(sig.double().numpy())
    assert isinstance(emb, torch.Tensor) and emb.shape == (60, 2)
    np.testing.assert_allclose(np.abs(emb.numpy()), np.abs(ref), rtol=1e-4, atol=1e-4)
    pytest.importorskip("umap")
    e1 = xai.project(sig, method="umap", seed=3, pca_components=10)
    e2 = xai.project(sig.numpy(), method="umap", seed=3, pca_components=10)
    assert e1.shape == (60, 2) and isinstance(e2, np.ndarray)
    np.testing.assert_allclose(e1.numpy(), e2, atol=1e-5)
    # the two clusters stay apart in the embedding
    c0, c1 = e1[:30].mean(0), e1[30:].mean(0)
    spread = max(float(e1[:30].std(0).norm()), float(e1[30:].std(0).norm()))
    assert float((c0 - c1).norm()) > 2 * spread


def test_project_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        xai.project(torch.rand(5))
    with pytest.raises(ValueError, match="at least 3"):
        xai.project(torch.rand(2, 4))
    with pytest.raises(ValueError, match="method"):
        xai.project(torch.rand(6, 4), method="tsne")
    with pytest.raises(ValueError, match="NaN"):
        xai.project(torch.full((6, 4), float("nan")))
    monkeypatch.setitem(sys.modules, "umap", None)        # as if umap-learn were not installed
    with pytest.raises(xai.MissingExtraError, match=r"robustops\[xai\]"):
        xai.project(torch.rand(10, 4), method="umap")
    with pytest.raises(ImportError):
        xai.project(torch.rand(10, 4))


def test_plots_return_figures():
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    model = models.small_cnn().eval()
    x = torch.rand(3, 1, 8, 8)
    x_adv = fgsm(model, x, None, eps=0.2)
    pair = xai.explain_pair(model, x, x_adv)
    fig = xai.plot_heatmaps(pair, images=(x, x_adv))
    assert isinstance(fig, Figure) and len(fig.axes) == 5 * 3
    fig = xai.plot_heatmaps(xai.lrp(model, x), images=x, titles=["a", "b", "c"])
    assert len(fig.axes) == 2 * 3
    emb = torch.randn(8, 2)
    fig = xai.plot_embedding(emb, labels=torch.arange(8) % 3, success=torch.arange(8) > 4,
                             adversarial=torch.arange(8) >= 4)
    assert len(fig.axes) == 2
    assert len(xai.plot_embedding(emb).axes) == 1
    with pytest.raises(ValueError, match="labels must have shape"):
        xai.plot_embedding(emb, labels=torch.arange(3))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        xai.plot_embedding(torch.randn(8, 3))
    import matplotlib.pyplot as plt
    plt.close("all")


@pytest.fixture(scope="module")
def digits_model():
    x, y = data.as_tensors(data.load("digits", split="train"))
    model = models.small_cnn()
    models.train(model, (x[:600], y[:600]), epochs=3, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    xt, yt = data.as_tensors(data.load("digits", split="test"))
    return model.eval(), (x[:600], y[:600]), (xt[:200], yt[:200])


@pytest.mark.slow
def test_adversarial_retrain_fgsm(digits_model):
    model, (x, y), (xt, yt) = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    atk = FGSM(model, eps=0.15)
    new, rep = xai.adversarial_retrain(model, (x, y), atk, epochs=2, seed=0, lr=2e-3)
    for k, v in model.state_dict().items():       # input model untouched
        assert torch.equal(v, before[k])
    assert not model.training and new is not model
    pred = model(x).argmax(1)
    x_adv = atk(x, y)
    ok = (pred == y) & (model(x_adv).argmax(1) != y)
    assert rep.n_train == 600 and rep.n_attacked == 600 and rep.n_adversarial == int(ok.sum()) > 0
    assert rep.n_correct == int((pred == y).sum())
    assert abs(rep.attack_success_rate - rep.n_adversarial / rep.n_correct) < 1e-12
    assert len(rep.history["loss"]) == 2 and rep.settings["epochs"] == 2
    # the retrained model resists the clean model's FGSM examples of held-out data far better
    xt_adv = atk(xt, yt)
    acc_old = float((model(xt_adv).argmax(1) == yt).float().mean())
    acc_new = float((new(xt_adv).argmax(1) == yt).float().mean())
    assert acc_new > acc_old + 0.1, (acc_old, acc_new)
    # same seed, same model
    new2, _ = xai.adversarial_retrain(model, (x, y), atk, epochs=2, seed=0, lr=2e-3)
    for (k, v), v2 in zip(new.state_dict().items(), new2.state_dict().values()):
        assert torch.equal(v, v2), k


def test_adversarial_retrain_callable_limit_and_errors(digits_model):
    model, (x, y), _ = digits_model
    calls = []

    def attack(m, xb, yb):
        calls.append(xb.shape[0])
        return fgsm(m, xb, yb, eps=0.2)

    new, rep = xai.adversarial_retrain(model, (x[:100], y[:100]), attack, epochs=1, attack_limit=40,
                                       attack_batch_size=16)
    assert sum(calls) == 40 and max(calls) == 16 and rep.n_attacked == 40 and rep.n_train == 100
    with pytest.raises(TypeError, match="attack must be"):
        xai.adversarial_retrain(model, (x, y), "fgsm")
    with pytest.raises(TypeError, match="integer"):
        xai.adversarial_retrain(model, (x, y.float()), attack)
    with pytest.raises(ValueError, match="shape"):
        xai.adversarial_retrain(model, (x[:8], y[:8]), lambda m, a, b: a[:, :, :4])
    with pytest.raises(ValueError, match="epochs"):
        xai.adversarial_retrain(model, (x, y), attack, epochs=0)
