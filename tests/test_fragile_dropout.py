"""kernel_dropout (batched, exact) against the naive loop: copy the model, zero kernel c, evaluate.

Exactness: the batched path computes the first consumer as ``base - contribution`` instead of a
direct convolution, so logits differ from the naive loop by float rounding only. The tests check
logits with a tolerance and per-kernel accuracies for *exact* equality; labels are the unablated
model's own predictions, and in float64 the rounding is ~1e-12, far below any decision margin.
"""
import copy

import pytest
import torch
from torch import nn

from robustops.fragile import (EmptyDatasetError, LayerNotFoundError, MemoryBudgetError, NotAConvLayerError, ablated_copy,
                               kernel_dropout, kernel_dropout_naive, taylor_importance, variant_logits)
from robustops.models import papernot_mnist, resnet18


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small problems: one intra-op thread is faster and avoids OpenMP oversubscription on
    shared CI machines. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _checksum(model):
    return [(n, p.detach().clone()) for n, p in model.state_dict().items()]


def _same(model, snap):
    return all(torch.equal(model.state_dict()[n], t) for n, t in snap)


def _randomise_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _labels(model, head, x):
    """Make an untrained model's predictions input-dependent (its last bias is shifted so every
    logit has zero batch mean), then label x with its predictions, a few of them shifted. Kernel
    removals then change predictions, so per-kernel accuracies differ."""
    with torch.no_grad():
        head.bias -= model.eval()(x).mean(0)
        y = model(x).argmax(1)
    y[::7] = (y[::7] + 1) % 10
    return y


@pytest.fixture(scope="module")
def mnist_setup():
    torch.manual_seed(0)
    model = papernot_mnist(input_size=20)  # 20x20 inputs keep the naive loop fast
    x = torch.rand(32, 1, 20, 20)
    return model, x, _labels(model, model.fc3, x)


@pytest.fixture(scope="module")
def resnet_setup():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = resnet18(stem="mnist", width=0.125)
    _randomise_bn(model, gen)
    x = torch.rand(24, 1, 16, 16)
    return model, x, _labels(model, model.fc, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_papernot_matches_naive(mnist_setup, dtype):
    model, x, y = mnist_setup
    model = copy.deepcopy(model).to(dtype)
    x = x.to(dtype)
    logits, base = variant_logits(model, "conv1", x)
    acc, loss, base_acc, naive_logits = kernel_dropout_naive(model, "conv1", (x, y), batch_size=16,
                                                             return_logits=True)
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(logits, naive_logits, rtol=tol, atol=tol)
    res = kernel_dropout(model, "conv1", (x, y), batch_size=20, memory_budget=2**20)  # forces chunking
    assert res.method == "fused"
    # exact equality of the per-kernel accuracies (fp64: rounding ~1e-15 vs decision margins;
    # fp32: checked on this seeded setup, whose smallest margin is far above 1e-5)
    assert torch.equal(res.clean_accuracy, acc)
    torch.testing.assert_close(res.clean_loss, loss, rtol=1e-4, atol=1e-5)
    assert res.baseline_accuracy == base_acc
    assert res.num_kernels == 32 and res.num_examples == 32
    # kernels differ in importance on this setup (not all accuracies equal)
    assert res.clean_accuracy.unique().numel() > 1


def test_papernot_other_layers_and_all(mnist_setup):
    model, x, y = mnist_setup
    out = kernel_dropout(model, ["conv2", "conv4"], (x, y))
    for name in ("conv2", "conv4"):
        acc, _, _ = kernel_dropout_naive(model, name, (x, y))
        assert torch.equal(out[name].clean_accuracy, acc), name
    assert out["conv2"].method == "fused"   # conv2 -> act2 -> pool1 -> conv3
    assert out["conv4"].method == "masked"  # conv4 -> act4 -> pool2 -> flatten (not a conv)
    everything = kernel_dropout(model, "all", (x[:8], y[:8]))
    assert list(everything) == ["conv1", "conv2", "conv3", "conv4"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resnet_matches_naive(resnet_setup, dtype):
    model, x, y = resnet_setup
    model = copy.deepcopy(model).to(dtype)
    x = x.to(dtype)
    snap = _checksum(model)
    logits, _ = variant_logits(model, "conv1", x)
    acc, loss, base_acc, naive_logits = kernel_dropout_naive(model, "conv1", (x, y), return_logits=True)
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(logits, naive_logits, rtol=tol, atol=tol)
    res = kernel_dropout(model, "conv1", (x, y), batch_size=10)
    assert res.method == "fused"
    assert torch.equal(res.clean_accuracy, acc)
    assert res.baseline_accuracy == base_acc
    # a consumer inside a block, followed by BatchNorm + ReLU (folded into the op)
    res2 = kernel_dropout(model, "layer1.0.conv1", (x, y))
    acc2, _, _ = kernel_dropout_naive(model, "layer1.0.conv1", (x, y))
    assert torch.equal(res2.clean_accuracy, acc2)
    assert _same(model, snap)


def test_masked_and_hook_fallbacks_match(resnet_setup):
    model, x, y = resnet_setup
    fused = kernel_dropout(model, "conv1", (x, y))
    masked = kernel_dropout(model, "conv1", (x, y), fused=False)
    assert masked.method == "masked"
    assert torch.equal(fused.clean_accuracy, masked.clean_accuracy)

    class Untraceable(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.sum() > -1:  # data-dependent control flow: torch.fx cannot trace it
                return self.inner(x)
            return self.inner(x) * 0

    wrapped = Untraceable(model)
    hooked = kernel_dropout(wrapped, "inner.conv1", (x, y))
    assert hooked.method == "hook"
    assert torch.equal(hooked.clean_accuracy, fused.clean_accuracy)


def test_adversarial_and_model_untouched(mnist_setup):
    model, x, y = mnist_setup
    model = copy.deepcopy(model)
    model.train()
    model.fc3.weight.grad = torch.ones_like(model.fc3.weight)
    snap = _checksum(model)
    res = kernel_dropout(model, model.conv1, (x, y), adversarial=0.1, batch_size=16)
    assert res.adversarial_accuracy.shape == (32,)
    assert res.adversarial_eps == 0.1
    assert res.baseline_adversarial_accuracy <= res.baseline_accuracy
    assert _same(model, snap)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.fc3.weight.grad, torch.ones_like(model.fc3.weight))
    assert all(p.requires_grad for p in model.parameters())
    # a precomputed adversarial tensor gives the same numbers as the eps form
    from robustops.attacks.gradients import input_gradient
    from robustops.ops import fgsm_step
    model.eval()
    xs = []
    for i in range(0, 32, 16):
        g, _ = input_gradient(model, x[i:i + 16], y[i:i + 16])
        xs.append(fgsm_step(x[i:i + 16], g, [0.1])[0])
    res2 = kernel_dropout(model, "conv1", (x, y), adversarial=torch.cat(xs), batch_size=16)
    assert torch.equal(res2.adversarial_accuracy, res.adversarial_accuracy)


def test_dataloader_input(mnist_setup):
    model, x, y = mnist_setup
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=13)
    a = kernel_dropout(model, "conv1", loader)
    b = kernel_dropout(model, "conv1", (x, y), batch_size=13)
    assert torch.equal(a.clean_accuracy, b.clean_accuracy)


def test_taylor(mnist_setup):
    model, x, y = mnist_setup
    t = taylor_importance(model, "conv1", (x, y))
    assert t.shape == (32,) and (t >= 0).all()
    res = kernel_dropout(model, "conv1", (x, y), taylor=True)
    torch.testing.assert_close(res.taylor, t)
    assert -1.0 <= res.taylor_spearman <= 1.0
    assert model.conv1.weight.grad is None
    tp = taylor_importance(model, "conv1", (x, y), per_example=True)
    assert tp.shape == (32,) and (tp >= t - 1e-12).all()  # |mean| <= mean |.|


def test_bad_input(mnist_setup):
    model, x, y = mnist_setup
    with pytest.raises(LayerNotFoundError, match="nope"):
        kernel_dropout(model, "nope", (x, y))
    with pytest.raises(NotAConvLayerError, match="fc1"):
        kernel_dropout(model, "fc1", (x, y))
    with pytest.raises(LayerNotFoundError):
        kernel_dropout(model, nn.Conv2d(1, 2, 3), (x, y))
    with pytest.raises(EmptyDatasetError):
        kernel_dropout(model, "conv1", (x[:0], y[:0]))
    with pytest.raises(EmptyDatasetError):
        kernel_dropout(model, "conv1", [])
    with pytest.raises(MemoryBudgetError, match="too small"):
        kernel_dropout(model, "conv1", (x, y), memory_budget=1000)
    with pytest.raises(MemoryBudgetError):
        kernel_dropout(model, "conv1", (x, y), memory_budget=-5)


# ---------------------------------------------------------------------------------------------
# exactness for any model: in-place ops after the consumer, layers that mix samples of a batch
# ---------------------------------------------------------------------------------------------
def _hand_zeroed(model, layer, x, y):
    """Independent reference: for each kernel c, a copy with kernel c's weights and bias zeroed,
    evaluated on the whole batch at once (float64 sums)."""
    conv = model.get_submodule(layer)
    accs, losses = [], []
    for c in range(conv.out_channels):
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            m.get_submodule(layer).weight[c] = 0
            if m.get_submodule(layer).bias is not None:
                m.get_submodule(layer).bias[c] = 0
            logits = m(x)
        accs.append((logits.argmax(1) == y).double().mean().item())
        losses.append(torch.nn.functional.cross_entropy(logits.double(), y).item())
    return torch.tensor(accs, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64)


def _flags(model):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_issue_reproducer_inplace_relu_after_consumer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True),
                      nn.Flatten(), nn.Linear(256, 10))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    res = kernel_dropout(m, "0", (x, y))
    _, loss_naive, _ = kernel_dropout_naive(m, "0", (x, y))
    # was 9e-3: relu(relu(base) - contribution)
    assert (res.clean_loss - loss_naive).abs().max() < 1e-6
    assert res.method == "fused"


class _VGGish(nn.Module):
    """torchvision VGG/AlexNet pattern: every ReLU in place, also right after each consumer conv."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(8 * 2 * 2, 16), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                        nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


@pytest.mark.parametrize("layer", ["features.0", "features.2", "features.5"])
def test_vgg_style_inplace_relus_exact(layer):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = _VGGish().double()
    _randomise_bn(model, gen)
    x = torch.rand(30, 1, 8, 8, dtype=torch.float64)
    y = _labels(model, model.classifier[3], x)
    model.train()
    snap, flags = _checksum(model), _flags(model)
    res = kernel_dropout(model, layer, (x, y), batch_size=16)
    acc, loss, base_acc = kernel_dropout_naive(model, layer, (x, y), batch_size=16)
    ref_acc, ref_loss = _hand_zeroed(model, layer, x, y)
    torch.testing.assert_close(res.clean_loss, loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.clean_loss, ref_loss, rtol=1e-10, atol=1e-10)
    assert torch.equal(res.clean_accuracy, acc) and torch.equal(res.clean_accuracy, ref_acc)
    assert res.baseline_accuracy == base_acc
    logits, _ = variant_logits(model, layer, x)
    _, _, _, naive_logits = kernel_dropout_naive(model, layer, (x, y), batch_size=64, return_logits=True)
    torch.testing.assert_close(logits, naive_logits, rtol=1e-10, atol=1e-10)
    assert _same(model, snap) and _flags(model) == flags


def _batch_norm_net(norm):
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), norm,
                         nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))


class _SubtractBatchMean(nn.Module):
    """A custom layer whose output for one sample depends on the other samples of the batch."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


@pytest.mark.parametrize("norm, mixes", [
    (nn.BatchNorm2d(8, track_running_stats=False), True),   # the issue's reproducer
    (_SubtractBatchMean(), True),                            # found from the traced graph, not a class list
    (nn.InstanceNorm2d(8, affine=True), False),              # per-sample: stays on the stacked path
    (nn.GroupNorm(2, 8), False),
])
def test_batch_mixing_layers_exact(norm, mixes):
    torch.manual_seed(0)
    net = _batch_norm_net(norm).eval()
    x = torch.rand(40, 1, 8, 8)
    y = _labels(net, net[6], x)
    snap = _checksum(net)
    res = kernel_dropout(net, "0", (x, y))
    acc, loss, _ = kernel_dropout_naive(net, "0", (x, y))
    ref_acc, ref_loss = _hand_zeroed(net, "0", x, y)
    assert torch.equal(res.clean_accuracy, ref_acc) and torch.equal(acc, ref_acc)
    torch.testing.assert_close(res.clean_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert res.clean_accuracy.unique().numel() > 1
    assert res.extra["per_variant"] is mixes
    assert bool(res.extra["batch_mixing"]) is mixes
    assert res.method == "fused"  # the prefix and the consumer conv still run once
    assert _same(net, snap) and not net.training


def test_batch_mixing_before_layer_uses_whole_batches():
    """A batch-statistics norm *before* L: stacking variants is fine, micro-batching is not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(384, 10)).eval()
    x = torch.rand(100, 1, 8, 8)  # > the 64-example micro-batch
    y = _labels(net, net[8], x)
    res = kernel_dropout(net, "3", (x, y), batch_size=100)
    ref_acc, ref_loss = _hand_zeroed(net, "3", x, y)
    assert torch.equal(res.clean_accuracy, ref_acc)
    torch.testing.assert_close(res.clean_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert res.extra["per_variant"] is False and res.extra["batch_mixing"] == ["1"]


def test_batch_mixing_untraceable_model_uses_hook_path_per_variant():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _batch_norm_net(nn.BatchNorm2d(8, track_running_stats=False))

        def forward(self, x):
            if x.sum() > -1:  # data-dependent control flow
                return self.net(x)
            return self.net(x) * 0

    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.rand(40, 1, 8, 8)
    y = _labels(model, model.net[6], x)
    res = kernel_dropout(model, "net.0", (x, y))
    ref_acc, _ = _hand_zeroed(model, "net.0", x, y)
    assert res.method == "hook" and res.extra["per_variant"]
    assert torch.equal(res.clean_accuracy, ref_acc)


def test_ablated_copy_checks_kernel_indices(mnist_setup):
    from robustops.fragile import SplitIndexError

    model, x, y = mnist_setup
    c = ablated_copy(model, "conv1", [0, 31])
    assert c.conv1.weight[[0, 31]].abs().sum() == 0 and c.conv1.bias[[0, 31]].abs().sum() == 0
    assert torch.equal(c.conv1.weight[1:31], model.conv1.weight[1:31])
    for bad in ([-1], [32], [1.5]):
        with pytest.raises(SplitIndexError, match="kernels"):
            ablated_copy(model, "conv1", bad)


class _TorchvisionStyleResNet(nn.Module):
    """torchvision's BasicBlock pattern: one shared ReLU(inplace=True) and ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.b_conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.b_bn1 = nn.BatchNorm2d(6)
        self.b_conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.b_bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        identity = x
        out = self.relu(self.b_bn1(self.b_conv1(x)))
        out = self.b_bn2(self.b_conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@pytest.mark.parametrize("layer", ["conv1", "b_conv1", "b_conv2"])
def test_torchvision_style_residual_inplace_exact(layer):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(11)
    model = _TorchvisionStyleResNet().double()
    _randomise_bn(model, gen)
    x = torch.rand(24, 1, 8, 8, dtype=torch.float64)
    y = _labels(model, model.fc, x)
    snap, flags = _checksum(model), _flags(model)
    res = kernel_dropout(model, layer, (x, y))
    ref_acc, ref_loss = _hand_zeroed(model, layer, x, y)
    assert torch.equal(res.clean_accuracy, ref_acc)
    torch.testing.assert_close(res.clean_loss, ref_loss, rtol=1e-10, atol=1e-10)
    assert _same(model, snap) and _flags(model) == flags


def test_value_changed_in_place_before_a_replayed_layer_reads_it():
    """A value from before L is changed in place and then read by a layer after L: the replay
    cannot reproduce what that layer saw, so the call takes the exact hook path."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Conv2d(1, 4, 3, padding=1)
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            a = self.pre(x)
            h = torch.tanh(self.conv(x))
            a.mul_(2.0)               # a changed in place (not a descendant of conv) ...
            out = self.conv2(h) + a   # ... before this replayed node reads it
            return self.fc(out.flatten(1))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.rand(20, 1, 8, 8, dtype=torch.float64)
    y = _labels(model, model.fc, x)
    res = kernel_dropout(model, "conv", (x, y))
    ref_acc, ref_loss = _hand_zeroed(model, "conv", x, y)
    assert res.method == "hook"
    assert torch.equal(res.clean_accuracy, ref_acc)
    torch.testing.assert_close(res.clean_loss, ref_loss, rtol=1e-10, atol=1e-10)
