"""Model zoo of the papers robustops reproduces, plus a small seeded training loop.

Builders (all return logits, never softmax; see each docstring for the layer names):

* :func:`papernot_mnist` - Papernot et al.'s MNIST net (Ranjan et al. 2017, Table 10)
* :func:`vgg11` - VGG11 for CIFAR-10 (Ranjan et al. 2017, Table 10), with the paper's mean
  subtraction as an in-model :class:`Normalize` layer (inputs stay in [0, 1])
* :func:`lenet` - LeNet-5-style substitute model for the black-box attack
* :func:`resnet18`, :func:`resnet50`, :func:`resnet101` - with "cifar" / "mnist" / "imagenet"
  stems (Pravin et al. 2021); the first convolution is ``model.conv1``
* :func:`small_cnn` - tiny CNN for 8x8 digits (tests, demo)

The sequential models (papernot_mnist, vgg11, lenet, small_cnn) accept ``conv_layer``,
``linear_layer`` and ``activation`` factories (and ``head`` for the last layer where it
applies), so robust variants (compact convolution, L2-softmax, bounded ReLU) are built from the
same definitions. ``get_model(name, **kw)`` looks a builder up by name; ``train`` and
``evaluate`` train and score any classifier.
"""
from .lenet import LeNet5, lenet
from .normalize import CIFAR10_MEAN, CIFAR10_STD, Normalize
from .papernot import PapernotMNIST, papernot_mnist
from .registry import MODELS, get_model, list_models
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50, resnet101
from .small import SmallCNN, small_cnn
from .training import evaluate, train
from .vgg import VGG11, vgg11

__all__ = [
    "papernot_mnist",
    "vgg11",
    "lenet",
    "resnet18",
    "resnet50",
    "resnet101",
    "small_cnn",
    "get_model",
    "list_models",
    "MODELS",
    "train",
    "evaluate",
    "PapernotMNIST",
    "VGG11",
    "LeNet5",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "SmallCNN",
    "Normalize",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]
