"""Shared fixtures: the devices to run on, a seeded RNG, and the ``needs_cuda`` marker."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test taking ``device`` runs on the CPU and, when present, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    """Each test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits_cnn_trained():
    """``small_cnn`` trained on sklearn's digits (seeded) and the data: ``(model, x_train,
    y_train, x_test, y_test)``. Shared by the detector test modules; tests must leave the model
    unchanged (the package guarantees it, and the detector tests check it)."""
    from robustops import data, models
    torch.manual_seed(0)
    xtr, ytr = data.as_tensors(data.load("digits", split="train"))
    xte, yte = data.as_tensors(data.load("digits", split="test"))
    model = models.small_cnn()
    models.train(model, (xtr, ytr), epochs=6, optimizer="adam", lr=3e-3, seed=0)
    model.eval()
    return model, xtr, ytr, xte, yte


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


# Hypothesis profiles for the property-based op tests (tests/test_ops_properties.py):
#   default "ci": few examples per test (a few hundred in all), no deadline (shared CI machines);
#   `pytest --hypothesis-profile=deep` for long local fuzzing runs.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the `test` extra; without it those tests skip
    pass
else:
    _common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    settings.register_profile("ci", max_examples=75, derandomize=True, **_common)
    settings.register_profile("deep", max_examples=3000, **_common)
    settings.load_profile("ci")


def free_port() -> int:
    """A free TCP port on localhost for a torchrun rendezvous (fixed ports collide between runs)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
