"""FGSM and PGD equal torchattacks' on the same model and seed (skipped without torchattacks)."""
import pytest
import torch

from robustops import data, models
from robustops.attacks import FGSM, PGD

torchattacks = pytest.importorskip("torchattacks")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    x_tr, y_tr = data.as_tensors(data.load("digits", split="train"))
    x_te, y_te = data.as_tensors(data.load("digits", split="test"))
    torch.manual_seed(0)
    model = models.small_cnn()
    models.train(model, (x_tr, y_tr), epochs=3, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    return model.eval(), x_te[:128], y_te[:128]


def _close(a, b):
    # Our loss is summed, torchattacks' is averaged: the gradients differ by the factor N, their
    # signs do not (unless a component is exactly 0 or rounding flips a near-zero sum).
    diff = (a != b).flatten(1).any(1)
    assert diff.double().mean().item() <= 0.02, f"{int(diff.sum())} of {a.shape[0]} samples differ"
    torch.testing.assert_close(a[~diff], b[~diff], rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_fgsm_equals_torchattacks(setup, eps):
    model, x, y = setup
    ours = FGSM(model, eps)(x, y)
    theirs = torchattacks.FGSM(model, eps=eps)(x, y)
    _close(ours, theirs)


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_equals_torchattacks(setup, targeted):
    model, x, y = setup
    labels = (y + 1) % 10 if targeted else y
    atk = torchattacks.PGD(model, eps=0.1, alpha=0.02, steps=5, random_start=True)
    if targeted:
        atk.set_mode_targeted_by_function(lambda images, labels: labels)
    torch.manual_seed(123)
    theirs = atk(x, labels)
    torch.manual_seed(123)  # seed=None: the random start draws from the global RNG, like torchattacks
    ours = PGD(model, 0.1, 0.02, 5, random_start=True, targeted=targeted)(x, labels)
    _close(ours, theirs)
    # an explicit seed draws the same stream from its own generator
    ours_seeded = PGD(model, 0.1, 0.02, 5, random_start=True, targeted=targeted, seed=123)(x, labels)
    _close(ours_seeded, theirs)
