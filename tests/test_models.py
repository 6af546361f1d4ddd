"""robustops.models: architectures of the papers, the name registry, and train / evaluate."""
import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from robustops.models import (
    MODELS,
    BasicBlock,
    Bottleneck,
    LeNet5,
    PapernotMNIST,
    ResNet,
    SmallCNN,
    VGG11,
    evaluate,
    get_model,
    lenet,
    list_models,
    papernot_mnist,
    resnet18,
    resnet50,
    resnet101,
    small_cnn,
    train,
    vgg11,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: on a 2-core machine shared with a compiler, two intra-op threads
    # spin against each other and a training step gets ~50x slower. One thread is the fast case.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits as (N, 1, 8, 8) floats in [0, 1], split 1347 / 450 with a fixed seed."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1347], perm[1347:]
    return x[tr], y[tr], x[te], y[te]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# output shapes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "builder, kwargs, input_shape",
    [
        (papernot_mnist, {}, (1, 28, 28)),
        (papernot_mnist, dict(in_channels=3, input_size=32), (3, 32, 32)),
        (papernot_mnist, dict(input_size=16), (1, 16, 16)),
        (papernot_mnist, dict(input_size=(28, 20)), (1, 28, 20)),
        (vgg11, {}, (3, 32, 32)),
        (vgg11, dict(batch_norm=True), (3, 32, 32)),
        (vgg11, dict(in_channels=1, input_size=28), (1, 28, 28)),
        (vgg11, dict(pool_after_conv1=True, dropout=0.5), (3, 32, 32)),
        (lenet, {}, (1, 28, 28)),
        (lenet, dict(in_channels=3, input_size=32), (3, 32, 32)),
        (lenet, dict(input_size=12), (1, 12, 12)),
        (small_cnn, {}, (1, 8, 8)),
        (small_cnn, dict(in_channels=3, input_size=16), (3, 16, 16)),
    ],
)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_sequential_output_shapes(builder, kwargs, input_shape, num_classes):
    model = builder(num_classes=num_classes, **kwargs).eval()
    out = model(torch.rand(3, *input_shape))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


RESNETS = [(resnet18, BasicBlock, (2, 2, 2, 2)), (resnet50, Bottleneck, (3, 4, 6, 3)), (resnet101, Bottleneck, (3, 4, 23, 3))]
STEM_INPUTS = {"cifar": (3, 32), "mnist": (1, 28), "imagenet": (3, 64)}


@pytest.mark.parametrize("builder, block, depths", RESNETS)
@pytest.mark.parametrize("stem", ["cifar", "mnist", "imagenet"])
@pytest.mark.parametrize("channels", ["default", 1, 3])
def test_resnet_output_shapes(builder, block, depths, stem, channels):
    default_ch, size = STEM_INPUTS[stem]
    kw = {} if channels == "default" else {"in_channels": channels}
    ch = default_ch if channels == "default" else channels
    model = builder(num_classes=5, stem=stem, width=0.125, **kw).eval()
    assert isinstance(model, ResNet)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == list(depths)
    assert all(isinstance(b, block) for b in model.layer3)
    out = model(torch.rand(2, ch, size, size))
    assert out.shape == (2, 5)
    assert model.features(torch.rand(2, ch, size, size)).shape == (2, model.fc.in_features)


def test_resnet_width_multiplier():
    assert resnet18(width=0.25).conv1.out_channels == 16
    assert resnet18(width=0.25).fc.in_features == 128
    assert resnet50(width=0.25).fc.in_features == 128 * 4
    assert resnet18().conv1.out_channels == 64


# --------------------------------------------------------------------------------------------
# parameter counts and layer names
# --------------------------------------------------------------------------------------------
def test_papernot_parameter_count_by_hand():
    conv = lambda cin, cout: cout * cin * 3 * 3 + cout  # noqa: E731
    fc = lambda fin, fout: fin * fout + fout  # noqa: E731
    # 28 -> 26 -> 24 -> pool 12 -> 10 -> 8 -> pool 4: fc1 sees 64 * 4 * 4 = 1024 features.
    expected = conv(1, 32) + conv(32, 32) + conv(32, 64) + conv(64, 64) + fc(1024, 200) + fc(200, 200) + fc(200, 10)
    assert expected == 320 + 9248 + 18496 + 36928 + 205000 + 40200 + 2010 == 312202
    model = papernot_mnist()
    assert n_params(model) == 312202
    assert model.flatten_features == 1024
    # 3-channel 32x32: 32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5, so fc1 sees 64 * 25.
    model = papernot_mnist(in_channels=3, input_size=32)
    assert model.flatten_features == 64 * 5 * 5
    assert n_params(model) == 312202 - 320 + conv(3, 32) - fc(1024, 200) + fc(1600, 200)


def test_papernot_layer_names_are_stable():
    model = papernot_mnist()
    assert isinstance(model, PapernotMNIST)
    assert list(dict(model.named_children())) == [
        "conv1", "act1", "conv2", "act2", "pool1",
        "conv3", "act3", "conv4", "act4", "pool2",
        "flatten", "fc1", "act5", "fc2", "act6", "fc3",
    ]
    assert model.fc3.out_features == 10 and model[-1] is model.fc3
    # No padding anywhere, as in Papernot's net.
    assert all(getattr(model, f"conv{i}").padding == (0, 0) for i in range(1, 5))


def test_vgg11_layout_matches_table10():
    model = vgg11()
    assert isinstance(model, VGG11)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert [model.fc1.out_features, model.fc2.out_features, model.fc3.out_features] == [512, 512, 10]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 4
    assert model.flatten_features == 512 * 2 * 2
    bn = vgg11(batch_norm=True)
    assert isinstance(bn.bn1, nn.BatchNorm2d) and bn.conv1.bias is None
    names = list(dict(bn.named_children()))
    assert names.index("conv1") < names.index("bn1") < names.index("act1")
    assert vgg11(pool_after_conv1=True).flatten_features == 512


def test_lenet_and_small_cnn_layout():
    model = lenet()
    assert isinstance(model, LeNet5)
    assert (model.conv1.out_channels, model.conv2.out_channels) == (6, 16)
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features) == (400, 120, 84)
    assert n_params(model) == 61706
    small = small_cnn()
    assert isinstance(small, SmallCNN)
    assert isinstance(small.conv1, nn.Conv2d) and small.conv1.out_channels == 16
    assert n_params(small) < 50_000


@pytest.mark.parametrize(
    "builder, expected",
    # torchvision's published counts for ImageNet (1000 classes).
    [(resnet18, 11_689_512), (resnet50, 25_557_032), (resnet101, 44_549_160)],
)
def test_resnet_imagenet_parameter_counts_match_reference(builder, expected):
    with torch.device("meta"):  # no memory, no initialisation cost
        model = builder(num_classes=1000, stem="imagenet")
    assert n_params(model) == expected


@pytest.mark.parametrize("builder", [resnet18, resnet50, resnet101])
@pytest.mark.parametrize("stem, kernel, stride, in_ch", [("cifar", 3, 1, 3), ("mnist", 3, 1, 1), ("imagenet", 7, 2, 3)])
def test_resnet_conv1_is_first_and_followed_by_bn1_relu(builder, stem, kernel, stride, in_ch):
    model = builder(stem=stem, width=0.125).eval()
    assert type(model.conv1) is nn.Conv2d
    assert model.conv1.kernel_size == (kernel, kernel) and model.conv1.stride == (stride, stride)
    assert model.conv1.in_channels == in_ch
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.relu, nn.ReLU)
    assert isinstance(model.maxpool, nn.MaxPool2d if stem == "imagenet" else nn.Identity)
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: order.append(name))
             for name, m in model.named_modules() if name]
    try:
        size = STEM_INPUTS[stem][1]
        model(torch.rand(1, in_ch, size, size))
    finally:
        for h in hooks:
            h.remove()
    assert order[:3] == ["conv1", "bn1", "relu"]
    assert order[-1] == "fc"


def test_resnet_ablating_conv1_kernel_changes_output():
    # What the fragile-kernel analysis does: zero one kernel of model.conv1 and re-evaluate.
    model = resnet18(stem="mnist", width=0.125).eval()
    x = torch.rand(2, 1, 28, 28)
    before = model(x)
    with torch.no_grad():
        model.conv1.weight[3].zero_()
    assert not torch.allclose(before, model(x))


# --------------------------------------------------------------------------------------------
# injectable layers
# --------------------------------------------------------------------------------------------
class MyConv(nn.Conv2d):
    pass


class MyLinear(nn.Linear):
    pass


class MyAct(nn.ReLU):
    pass


class MyHead(nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.lin = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.lin(F.normalize(x, dim=1))


@pytest.mark.parametrize(
    "builder, n_conv, n_fc, n_act, x_shape",
    [
        (papernot_mnist, 4, 3, 6, (1, 28, 28)),
        (vgg11, 8, 3, 10, (3, 32, 32)),
        (lenet, 2, 3, 4, (1, 28, 28)),
        (small_cnn, 2, 2, 3, (1, 8, 8)),
    ],
)
def test_injected_layer_classes_are_used(builder, n_conv, n_fc, n_act, x_shape):
    model = builder(conv_layer=MyConv, linear_layer=MyLinear, activation=MyAct).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    acts = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(convs) == n_conv and all(type(m) is MyConv for m in convs)
    assert len(fcs) == n_fc and all(type(m) is MyLinear for m in fcs)
    assert len(acts) == n_act and all(type(m) is MyAct for m in acts)
    # Every activation is its own module (hooks per layer need that).
    assert len({id(a) for a in acts}) == n_act
    assert model(torch.rand(2, *x_shape)).shape == (2, 10)


@pytest.mark.parametrize("builder, x_shape, hidden", [(papernot_mnist, (1, 28, 28), 200), (vgg11, (3, 32, 32), 512)])
def test_head_factory_and_instance(builder, x_shape, hidden):
    model = builder(num_classes=4, head=MyHead)
    assert isinstance(model.fc3, MyHead) and (model.fc3.in_features, model.fc3.num_classes) == (hidden, 4)
    assert model(torch.rand(2, *x_shape)).shape == (2, 4)
    head = MyHead(hidden, 4)
    assert builder(num_classes=4, head=head).fc3 is head


def test_activation_factory_and_layer_swap_by_name():
    model = papernot_mnist(activation=lambda: nn.Hardtanh(0.0, 1.0))  # bounded ReLU
    assert isinstance(model.act3, nn.Hardtanh)
    # Replacing one layer by name (the layer-wise study of Ranjan et al., Table 13) keeps order.
    model.conv2 = MyConv(32, 32, kernel_size=3)
    assert model[2] is model.conv2
    assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_conv_layer_instance_is_rejected():
    with pytest.raises(TypeError, match="conv_layer"):
        papernot_mnist(conv_layer=nn.Conv2d(1, 32, 3))
    with pytest.raises(TypeError, match="activation"):
        small_cnn(activation=nn.ReLU())
    with pytest.raises(TypeError, match="linear_layer"):
        lenet(linear_layer="linear")


# --------------------------------------------------------------------------------------------
# input sizes
# --------------------------------------------------------------------------------------------
def test_upsampled_digits_flow_through_papernot():
    x8 = torch.rand(4, 1, 8, 8)
    x28 = F.interpolate(x8, size=28, mode="bilinear", align_corners=False)
    assert papernot_mnist(input_size=28)(x28).shape == (4, 10)


@pytest.mark.parametrize(
    "builder, too_small, smallest_ok",
    [(papernot_mnist, 15, 16), (vgg11, 15, 16), (lenet, 11, 12), (small_cnn, 1, 2)],
)
def test_too_small_input_size_raises(builder, too_small, smallest_ok):
    with pytest.raises(ValueError, match="input_size"):
        builder(input_size=too_small)
    with pytest.raises(ValueError, match="input_size"):
        builder(input_size=(smallest_ok, too_small))
    builder(input_size=smallest_ok)
    with pytest.raises(ValueError, match="input_size"):
        builder(input_size=(28, 28, 28))
    with pytest.raises(TypeError, match="input_size"):
        builder(input_size=28.0)
    with pytest.raises(ValueError, match="input_size"):
        builder(input_size=0)


def test_builder_argument_checks():
    with pytest.raises(ValueError, match="num_classes"):
        papernot_mnist(num_classes=0)
    with pytest.raises(TypeError, match="in_channels"):
        vgg11(in_channels=3.0)
    with pytest.raises(ValueError, match="stem"):
        resnet18(stem="tiny")
    with pytest.raises(ValueError, match="width"):
        resnet50(width=0)
    with pytest.raises(ValueError, match="dropout"):
        vgg11(dropout=1.0)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def test_registry_names_and_forwarding():
    names = ["lenet", "papernot_mnist", "resnet101", "resnet18", "resnet50", "small_cnn", "vgg11"]
    assert list_models() == names and sorted(MODELS) == names
    assert isinstance(get_model("papernot_mnist", num_classes=3), PapernotMNIST)
    assert get_model("small_cnn", num_classes=3).fc2.out_features == 3
    m = get_model("resnet18", stem="mnist", width=0.125)
    assert isinstance(m, ResNet) and m.conv1.in_channels == 1
    assert isinstance(get_model("Small-CNN"), SmallCNN)


def test_registry_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_model("alexnet")
    msg = str(err.value)
    assert "alexnet" in msg and all(n in msg for n in list_models())
    with pytest.raises(TypeError, match="name"):
        get_model(None)
    with pytest.raises(TypeError):
        get_model("lenet", stem="cifar")  # builder's own TypeError for an unknown keyword


# --------------------------------------------------------------------------------------------
# train / evaluate
# --------------------------------------------------------------------------------------------
def test_small_cnn_learns_digits(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = small_cnn()
    hist = train(model, (xtr, ytr), epochs=5, optimizer="adam", lr=3e-3, batch_size=32, seed=0)
    assert set(hist) == {"loss", "accuracy", "lr", "time"}
    assert all(len(v) == 5 for v in hist.values())
    assert hist["loss"][-1] < hist["loss"][0]
    acc, loss = evaluate(model, (xte, yte))
    assert acc > 0.9, acc
    assert 0 < loss < 0.5


def test_training_is_deterministic_with_seed(digits):
    xtr, ytr, _, _ = digits
    x, y = xtr[:256], ytr[:256]
    torch.manual_seed(0)
    base = small_cnn()

    def run(seed, form):
        model = copy.deepcopy(base)
        if form == "pair":
            data = (x, y)
        elif form == "loader":  # shuffles from the global RNG
            data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
        else:  # shuffles from its own generator, which train() must reseed
            data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                              generator=torch.Generator().manual_seed(123))
        hist = train(model, data, epochs=2, optimizer="sgd", lr=0.05, seed=seed, batch_size=32)
        return model.state_dict(), hist

    for form in ("pair", "loader", "loader_with_generator"):
        (a, ha), (b, hb) = run(7, form), run(7, form)
        assert ha["loss"] == hb["loss"]
        assert all(torch.equal(a[k], b[k]) for k in a), form
        c, _ = run(8, form)
        assert not all(torch.equal(a[k], c[k]) for k in a), form


@pytest.mark.parametrize("initially_training", [True, False])
def test_train_and_evaluate_restore_mode(initially_training):
    model = small_cnn().train(initially_training)
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    train(model, (x, y), epochs=1, seed=0)
    assert all(m.training == initially_training for m in model.modules())
    evaluate(model, (x, y))
    assert all(m.training == initially_training for m in model.modules())


def test_mixed_modes_restored():
    model = vgg11(batch_norm=True, input_size=16)
    model.train()
    model.bn1.eval()  # e.g. a frozen batch norm
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    train(model, (x, y), epochs=1, seed=0)
    evaluate(model, (x, y))
    assert model.training and not model.bn1.training and model.bn2.training


def test_evaluate_restores_mode_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            assert not self.training
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, (torch.rand(3, 2), torch.zeros(3, dtype=torch.long)))
    assert model.training


def test_evaluate_matches_direct_computation():
    logits = torch.randn(37, 5)
    y = torch.randint(0, 5, (37,))
    model = nn.Identity()  # the "inputs" are the logits
    acc, loss = evaluate(model, (logits, y), batch_size=8)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    acc2, loss2 = evaluate(model, DataLoader(TensorDataset(logits, y), batch_size=10))
    assert (acc2, loss2) == pytest.approx((acc, loss), rel=1e-6)


def test_lr_milestones_and_options():
    model = small_cnn()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    hist = train(model, (x, y), epochs=3, lr=0.1, lr_milestones=[1, 2], lr_gamma=0.5, seed=0,
                 weight_decay=5e-4, label_smoothing=0.1)
    assert hist["lr"] == pytest.approx([0.1, 0.05, 0.025])
    # Soft (probability) targets, as in defensive distillation.
    soft = torch.softmax(torch.randn(16, 10), dim=1)
    hist = train(model, (x, soft), epochs=1, optimizer="adam", seed=0)
    assert 0 <= hist["accuracy"][0] <= 1
    # A custom loss and a ready-made optimizer.
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, (x, y), optimizer=opt, loss_fn=lambda out, t: F.cross_entropy(out, t) * 2, seed=0)
    with pytest.raises(ValueError, match="lr"):
        train(model, (x, y), optimizer=opt, lr=0.1)


def test_train_resnet_one_epoch():
    model = resnet18(stem="mnist", width=0.125)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = model.conv1.weight.detach().clone()
    hist = train(model, (x, y), epochs=1, batch_size=4, seed=0)
    assert len(hist["loss"]) == 1
    assert not torch.equal(before, model.conv1.weight)


@pytest.mark.parametrize("tqdm_present", [True, False])
def test_progress_with_and_without_tqdm(monkeypatch, tqdm_present):
    if not tqdm_present:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    model = small_cnn()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    hist = train(model, (x, y), epochs=1, progress=True, seed=0)
    assert len(hist["loss"]) == 1


def test_train_bad_arguments():
    model = small_cnn()
    data = (torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    with pytest.raises(ValueError, match="epochs"):
        train(model, data, epochs=0)
    with pytest.raises(TypeError, match="epochs"):
        train(model, data, epochs=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        train(model, data, optimizer="rmsprop")
    with pytest.raises(TypeError, match="optimizer"):
        train(model, data, optimizer=3)
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="label_smoothing"):
            train(model, data, label_smoothing=bad)
    with pytest.raises(ValueError, match="lr"):
        train(model, data, lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        train(model, data, momentum=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        train(model, data, weight_decay=-1e-4)
    with pytest.raises(ValueError, match="lr_milestones"):
        train(model, data, epochs=3, lr_milestones=[2, 1])
    with pytest.raises(ValueError, match="label_smoothing"):
        train(model, data, loss_fn=F.cross_entropy, label_smoothing=0.1)
    with pytest.raises(TypeError, match="model"):
        train("model", data)
    with pytest.raises(TypeError, match="loader"):
        train(model, torch.rand(8, 1, 8, 8))
    with pytest.raises(ValueError, match="y"):
        train(model, (torch.rand(8, 1, 8, 8), torch.randint(0, 10, (7,))))
    with pytest.raises(TypeError, match="labels"):
        train(model, (torch.rand(8, 1, 8, 8), torch.rand(8)))


def test_empty_loaders_raise():
    model = small_cnn()
    empty_x, empty_y = torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    for empty in (DataLoader(TensorDataset(empty_x, empty_y), batch_size=4), [], (empty_x, empty_y)):
        with pytest.raises(ValueError, match="empty|no examples"):
            train(model, empty)
        with pytest.raises(ValueError, match="empty|no examples"):
            evaluate(model, empty)
    # A one-shot generator is exhausted after the first epoch.
    batches = ((torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2))
    with pytest.raises(ValueError, match="epoch 2"):
        train(model, batches, epochs=2)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, (torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=0)


# --------------------------------------------------------------------------------------------
# train / evaluate: eval-mode submodules, labels up front, shared output and label rules
# --------------------------------------------------------------------------------------------
def _bn_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_keeps_user_eval_batchnorm_in_eval_mode():
    torch.manual_seed(0)
    model = _bn_cnn().train()
    frozen, live = model[1], model[4]
    frozen.eval()
    before = _state(model)
    seen = []
    frozen.register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    train(model, (x, y), epochs=2, batch_size=8, seed=0)
    after = model.state_dict()
    # the frozen batch norm ran in eval mode and kept its running statistics (buffer checksums)
    assert seen and not any(seen)
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(after[k], before[k]), k
    # the other one trained: its statistics moved, 8 batches counted
    assert not torch.equal(after["4.running_mean"], before["4.running_mean"])
    assert int(after["4.num_batches_tracked"]) == 8
    assert model.training and not frozen.training and live.training
    # a model passed entirely in eval mode is trained whole (and put back in eval mode)
    model2 = _bn_cnn().eval()
    train(model2, (x, y), epochs=1, batch_size=8, seed=0)
    assert int(model2.state_dict()["1.num_batches_tracked"]) == 4
    assert not any(m.training for m in model2.modules())


@pytest.mark.parametrize("form", ["pair", "loader"])
def test_train_checks_labels_before_any_update(form):
    torch.manual_seed(0)
    model = _bn_cnn().train()
    before = _state(model)
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    y[-1] = 10  # out of range for 10 classes: in the last batch
    data = (x, y) if form == "pair" else DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(ValueError, match="class 10"):
        train(model, data, epochs=1, batch_size=4, seed=0)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # no parameter, no buffer changed
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=">= 0"):
        train(model, (x, y - 20), epochs=1)
    with pytest.raises(TypeError, match="integer"):
        train(model, (x, y.bool()), epochs=1)
    with pytest.raises(ValueError, match="class 10"):
        evaluate(model, (x, y))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_train_and_evaluate_accept_any_integer_labels(dtype):
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,))
    ref, got = small_cnn(), small_cnn()
    got.load_state_dict(ref.state_dict())
    h_ref = train(ref, (x, y), epochs=1, batch_size=8, seed=0)
    h_got = train(got, (x, y.to(dtype)), epochs=1, batch_size=8, seed=0)
    assert h_ref["loss"] == h_got["loss"]
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
    loader = DataLoader(TensorDataset(x, y.to(dtype)), batch_size=8)
    assert evaluate(got, loader) == evaluate(ref, DataLoader(TensorDataset(x, y), batch_size=8))
    assert evaluate(got, (x, y.to(dtype))) == evaluate(ref, (x, y))


def test_train_and_evaluate_refuse_tuple_outputs():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            logits = self.fc(x.flatten(1))
            return logits, logits.softmax(1)

    model = Pair()
    before = _state(model)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)).int()
    with pytest.raises(ValueError, match="SelectOutput"):
        train(model, (x, y))
    with pytest.raises(ValueError, match="SelectOutput"):
        evaluate(model, (x, y))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    from robustops import SelectOutput
    train(SelectOutput(model, 0), (x, y), epochs=1)
    acc, loss = evaluate(SelectOutput(model, 0), (x, y))
    assert 0 <= acc <= 1 and loss > 0


def test_evaluate_refuses_nan_logits():
    class Nan(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 10), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        evaluate(Nan(), (torch.rand(4, 3), torch.zeros(4, dtype=torch.long)))


# --------------------------------------------------------------------------------------------
# vgg11: the paper's pre-processing inside the model
# --------------------------------------------------------------------------------------------
def test_vgg11_mean_subtraction_inside_the_model():
    from robustops.models import CIFAR10_MEAN, CIFAR10_STD, Normalize

    torch.manual_seed(0)
    model = vgg11().eval()
    assert isinstance(model.normalize, Normalize) and list(dict(model.named_children()))[:2] == ["normalize", "conv1"]
    bare = vgg11(mean=None).eval()
    assert not hasattr(bare, "normalize")
    bare.load_state_dict(model.state_dict())  # same keys: the pre-processing is not training state
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare(x - 0.5))  # Ranjan et al.: mean subtraction of 0.5
        per_channel = vgg11(mean=CIFAR10_MEAN, std=CIFAR10_STD).eval()
        per_channel.load_state_dict(model.state_dict())
        ref = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(per_channel(x), bare(ref))
    with pytest.raises(ValueError, match="one value per input channel"):
        vgg11(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="> 0"):
        vgg11(std=0.0)
    with pytest.raises(ValueError, match="Normalize expects"):
        Normalize(0.5, channels=3)(torch.rand(2, 1, 8, 8))


def test_train_and_evaluate_refuse_list_inputs():
    model = small_cnn()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    before = _state(model)
    with pytest.raises(TypeError, match="tensors"):
        train(model, [x.tolist(), y])
    with pytest.raises(TypeError, match="tensors"):
        evaluate(model, (x.tolist(), y.tolist()))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_train_under_no_grad_or_inference_mode_equals_plain(mode):
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 10, (24,)).int()
    ref, got = small_cnn(), small_cnn()
    got.load_state_dict(ref.state_dict())
    h_ref = train(ref, (x, y), epochs=1, batch_size=8, seed=0)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        h_got = train(got, (x, y), epochs=1, batch_size=8, seed=0)
        assert evaluate(got, (x, y)) == evaluate(ref, (x, y))
    assert h_ref["loss"] == h_got["loss"]
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), got.state_dict().values()))
