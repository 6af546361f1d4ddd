"""What the report runs on: the data set, the model(s), the output folder.

Every problem a user can fix from the command line (a missing data folder, an unknown architecture,
a corrupt or mismatched checkpoint, an output folder that cannot be written) raises
:class:`UsageError` with one line naming the problem and the fix; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import copy
import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["UsageError", "DataBundle", "ModelEntry", "load_data", "build_models", "prepare_out",
           "DATA_CHOICES", "DATA_SHAPES"]

DATA_CHOICES = ("digits", "fashion-mnist", "mnist", "cifar10")
#: (channels, height/width, classes) of each data set.
DATA_SHAPES = {"digits": (1, 8, 10), "fashion-mnist": (1, 28, 10), "mnist": (1, 28, 10), "cifar10": (3, 32, 10)}


class UsageError(Exception):
    """Bad input the user can fix: the CLI prints the message on one line and exits with code 2."""


@dataclass
class DataBundle:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    channels: int
    size: int
    num_classes: int
    n_train_total: int = 0
    n_test_total: int = 0

    def describe(self) -> str:
        return (f"{self.name}: {self.x_train.shape[0]} training / {self.x_test.shape[0]} evaluation images "
                f"of {self.channels}x{self.size}x{self.size}, {self.num_classes} classes")


@dataclass
class ModelEntry:
    """One model in the report (the default report has two, side by side)."""

    label: str                 # column title, e.g. "small_cnn" / "small_cnn (CCN)"
    model: nn.Module
    source: str                # how it was obtained, one sentence
    arch: Optional[str] = None
    train_seconds: Optional[float] = None
    history: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_data(name: str, root: Optional[str], *, train_limit: Optional[int], test_limit: Optional[int],
              seed: int = 0) -> DataBundle:
    """Load ``name`` (one of :data:`DATA_CHOICES`) from ``root``; limits keep the first images of a
    seeded permutation (class-balanced in expectation)."""
    from robustops import data as rdata

    if name not in DATA_CHOICES:
        raise UsageError(f"unknown --data {name!r}; use one of {', '.join(DATA_CHOICES)}")
    if root is not None and name != "digits" and not os.path.isdir(os.path.expanduser(root)):
        raise UsageError(f"--root {root!r} is not a directory; pass the folder holding the {name} files")
    try:
        train = rdata.load(name, root=root, split="train")
        test = rdata.load(name, root=root, split="test")
    except (FileNotFoundError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot load --data {name}: {first}; pass --root DIR with the {name} files "
                         f"(or set ROBUSTOPS_DATA)") from e
    x_tr, y_tr = rdata.as_tensors(train)
    x_te, y_te = rdata.as_tensors(test)
    n_tr, n_te = x_tr.shape[0], x_te.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if train_limit is not None and train_limit < n_tr:
        idx = torch.randperm(n_tr, generator=gen)[:train_limit]
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    if test_limit is not None and test_limit < n_te:
        idx = torch.randperm(n_te, generator=gen)[:test_limit].sort().values
        x_te, y_te = x_te[idx], y_te[idx]
    c, s, k = DATA_SHAPES[name]
    return DataBundle(name, x_tr.contiguous(), y_tr, x_te.contiguous(), y_te, c, s, k, n_tr, n_te)


def _arch_kwargs(builder, bundle: DataBundle) -> dict:
    params = inspect.signature(builder).parameters
    kw = {}
    if "in_channels" in params:
        kw["in_channels"] = bundle.channels
    if "num_classes" in params:
        kw["num_classes"] = bundle.num_classes
    if "input_size" in params:
        kw["input_size"] = bundle.size
    if "stem" in params:
        kw["stem"] = "mnist" if bundle.channels == 1 else "cifar"
    return kw


def make_arch(arch: str, bundle: DataBundle) -> nn.Module:
    from robustops import models

    key = arch.strip().lower().replace("-", "_")
    if key not in models.MODELS:
        raise UsageError(f"unknown --model {arch!r}; use one of {', '.join(models.list_models())}")
    builder = models.MODELS[key]
    try:
        return builder(**_arch_kwargs(builder, bundle))
    except (ValueError, TypeError) as e:
        raise UsageError(f"--model {arch} cannot take {bundle.channels}x{bundle.size}x{bundle.size} inputs of "
                         f"--data {bundle.name} ({e}); pick another --model") from e


def _load_state_dict(path: str, device: torch.device) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--weights {path!r}: no such file; pass the path of a saved state_dict")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--weights {path!r} is not a readable state_dict ({msg[:160]}); save one with "
                         f"torch.save(model.state_dict(), path)") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"--weights {path!r} holds a {type(obj).__name__}, not a state_dict of tensors; save one "
                         f"with torch.save(model.state_dict(), path)")
    return obj


def _load_torchscript(path: str, device: torch.device) -> nn.Module:
    if not os.path.isfile(path):
        raise UsageError(f"--torchscript {path!r}: no such file; pass a file written by torch.jit.save")
    try:
        return torch.jit.load(path, map_location=device)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--torchscript {path!r} cannot be loaded ({msg[:160]}); pass a file written by "
                         f"torch.jit.save") from e


def _check_model_fits(model: nn.Module, bundle: DataBundle, what: str) -> None:
    from robustops._checks import as_logits

    x = bundle.x_test[:2]
    try:
        with torch.no_grad():
            out = as_logits(model(x.to(_device_of(model))), x.shape[0])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} does not run on --data {bundle.name} images of shape "
                         f"{tuple(x.shape[1:])} ({msg[:160]}); pass the data set it was trained for") from e
    if out.shape[1] != bundle.num_classes:
        raise UsageError(f"{what} returns {out.shape[1]} logits but --data {bundle.name} has "
                         f"{bundle.num_classes} classes; pass the data set it was trained for")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def train_model(model: nn.Module, bundle: DataBundle, *, epochs: int, seed: int, progress: bool
                ) -> Tuple[float, Dict[str, List[float]]]:
    from robustops import models

    t0 = time.perf_counter()
    hist = models.train(model, (bundle.x_train, bundle.y_train), epochs=epochs, optimizer="adam", lr=3e-3,
                        batch_size=32 if bundle.name == "digits" else 64, seed=seed, progress=progress)
    return time.perf_counter() - t0, hist


def build_models(bundle: DataBundle, *, arch: Optional[str], weights: Optional[str], torchscript: Optional[str],
                 device: torch.device, seed: int, epochs: int, twin: Optional[bool] = None,
                 progress: bool = False) -> List[ModelEntry]:
    """The models of the report.

    * ``torchscript``: that module, as is.
    * ``weights``: ``arch`` (default ``small_cnn``) built for the data's shape, the state_dict loaded
      with ``weights_only=True`` and ``strict=True``.
    * neither: ``arch`` trained here (Adam, ``epochs``, ``seed``); with ``twin`` (default: when
      nothing was given) also its compact-convolution twin (every Conv2d/Linear replaced by
      CompactConv2d/CompactLinear, same initial weights, trained the same way).
    """
    from robustops import nn as rnn

    if weights and torchscript:
        raise UsageError("--weights and --torchscript were both given; pass only one of them")
    if torchscript:
        if arch:
            raise UsageError("--model is not used with --torchscript (the file holds the architecture); drop --model")
        model = _load_torchscript(torchscript, device)
        model.eval()
        _check_model_fits(model, bundle, f"--torchscript {torchscript}")
        return [ModelEntry(os.path.basename(torchscript), model, f"TorchScript module loaded from {torchscript}")]
    arch_name = arch or "small_cnn"
    model = make_arch(arch_name, bundle).to(device)
    if weights:
        sd = _load_state_dict(weights, device)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise UsageError(f"--weights {weights} does not match --model {arch_name} for --data {bundle.name} "
                             f"({detail[:160]}); pass the --model and --data it was saved from") from e
        model.eval()
        _check_model_fits(model, bundle, f"--weights {weights}")
        return [ModelEntry(arch_name, model, f"{arch_name} with weights loaded from {weights}", arch=arch_name)]
    # trained here
    twin = (arch is None) if twin is None else twin
    torch.manual_seed(seed)
    init = make_arch(arch_name, bundle).to(device)
    entries = []
    base = copy.deepcopy(init)
    secs, hist = train_model(base, bundle, epochs=epochs, seed=seed, progress=progress)
    entries.append(ModelEntry(arch_name, base.eval(), f"{arch_name} trained here: Adam lr 3e-3, {epochs} epochs, "
                              f"seed {seed}", arch=arch_name, train_seconds=secs, history=hist))
    if twin:
        ccn = rnn.compactify(init).to(device)
        secs, hist = train_model(ccn, bundle, epochs=epochs, seed=seed, progress=progress)
        entries.append(ModelEntry(f"{arch_name} (CCN)", ccn.eval(),
                                  f"compact-convolution twin (robustops.nn.compactify of the same initial weights), "
                                  f"trained the same way", arch=arch_name, train_seconds=secs, history=hist))
    return entries


def prepare_out(out: str) -> str:
    """Create ``out`` and check it is writable."""
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {out!r} is a file, not a directory; pass a directory path")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".robustops-write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out!r} ({e.strerror or e}); pass a writable directory") from e
    return path
