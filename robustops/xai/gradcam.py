"""Grad-CAM (Selvaraju et al. 2017) with per-neuron selection (Granda et al., Sec. 5.3).

``cam = ReLU(sum_{k in channels} alpha_k A^k)``, ``alpha_k = mean_{h,w} d y_target / d A^k_{h,w}``,
upsampled bilinearly to the input's spatial size. ``channels`` restricts the sum: one channel is
the paper's isolated neuron ("setting the weight of other filters in that layer to zero within the
GradCAM formulation"), a list combines neurons (e.g. the relevant neurons a detector selected).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import as_logits, check_model
from .._gradients import autograd_on
from .._guard import frozen_model, model_device
from .core import _check_batch, _targets, resolve_layer
from .errors import SharedModuleError

__all__ = ["gradcam"]

NORMALIZE = (None, "minmax", "max")


def _channels(channels, k: int, device) -> Optional[torch.Tensor]:
    if channels is None:
        return None
    if isinstance(channels, torch.Tensor):
        if channels.dtype == torch.bool:
            if channels.shape != (k,):
                raise ValueError(f"a boolean channels mask must have shape ({k},), got {tuple(channels.shape)}")
            idx = channels.nonzero().flatten()
        elif channels.is_floating_point():
            raise TypeError(f"channels must hold integer indices, got dtype {channels.dtype}")
        else:
            idx = channels.flatten().long()
    elif isinstance(channels, int) and not isinstance(channels, bool):
        idx = torch.tensor([channels])
    elif isinstance(channels, Sequence) and all(isinstance(c, int) and not isinstance(c, bool) for c in channels):
        idx = torch.tensor(list(channels), dtype=torch.long)
    else:
        raise TypeError(f"channels must be None, an int, a sequence of ints or a tensor, got {channels!r}")
    if idx.numel() == 0:
        raise ValueError("channels selects no channel")
    if int(idx.min()) < 0 or int(idx.max()) >= k:
        raise ValueError(f"channels must be in [0, {k}) for this layer ({k} channels), got {idx.tolist()}")
    return idx.to(device)


def gradcam(model: nn.Module, x: torch.Tensor, layer: Union[str, nn.Module], target=None, channels=None, *,
            normalize: Optional[str] = None, upsample: bool = True) -> torch.Tensor:
    """Grad-CAM heatmaps of ``layer`` for the ``target`` class.

    Args:
        model: classifier returning ``(N, C)`` logits (never modified; eval mode inside).
        x: images ``[N, C, H, W]``.
        layer: a module name (``"conv4"``, ``"layer4.1.conv2"``) or the module; its output must be
            a ``[N, K, h, w]`` tensor, and it must run once per forward.
        target: None (predicted class), an int, or ``[N]`` labels.
        channels: None (all K channels), an int (one neuron), a list / integer tensor of channel
            indices, or a boolean mask ``[K]``.
        normalize: None (default: absolute magnitude, comparable across images and neurons),
            ``"minmax"`` (per image to [0, 1], as pytorch-grad-cam) or ``"max"`` (divide by the max).
        upsample: bilinear upsampling to ``x``'s ``H x W`` (``align_corners=False``); False keeps
            the layer's ``h x w``.

    Returns:
        ``[N, H, W]`` (``[N, h, w]`` without upsampling), non-negative, on ``x``'s device.

    Raises:
        :class:`~robustops.xai.errors.LayerNotFoundError`, ``ValueError`` (layer output not 4-D,
        channels out of range, target out of range, x not a batch), :class:`SharedModuleError`
        (the layer runs more than once).
    """
    check_model(model)
    x = _check_batch(x)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    module = resolve_layer(model, layer)
    seen = []

    def hook(m, args, output):
        # the map becomes a leaf that requires grad: the backward stops there, and no graph is
        # built for the layers before it
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            output = output.detach().requires_grad_(True)
            seen.append(output)
            return output
        seen.append(output)

    with frozen_model(model), autograd_on():
        device = model_device(model, default=x.device)
        xi = x.detach().to(device).clone()  # a normal tensor even if x is an inference tensor
        handle = module.register_forward_hook(hook)
        try:
            logits = as_logits(model(xi), x.shape[0])
        finally:
            handle.remove()
        if len(seen) != 1:
            if not seen:
                raise ValueError(f"layer {layer!r} did not run in the forward pass")
            raise SharedModuleError(f"layer {layer!r} runs {len(seen)} times in one forward pass; Grad-CAM needs "
                                    "one activation map")
        a = seen[0]
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(f"Grad-CAM needs a layer with a [N, K, h, w] output; {layer!r} returns {shape}")
        tgt = _targets(target, logits)
        score = logits.gather(1, tgt[:, None]).sum()
        (g,) = torch.autograd.grad(score, a)
    a = a.detach()
    alpha = g.mean(dim=(2, 3))  # [N, K]
    idx = _channels(channels, a.shape[1], a.device)
    if idx is not None:
        alpha, a = alpha[:, idx], a[:, idx]
    cam = torch.relu(torch.einsum("nk,nkhw->nhw", alpha, a))
    if upsample and cam.shape[-2:] != x.shape[-2:]:
        cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        cam = cam.clamp_min(0)
    if normalize == "minmax":
        flat = cam.reshape(cam.shape[0], -1)
        lo = flat.min(1).values.view(-1, 1, 1)
        hi = flat.max(1).values.view(-1, 1, 1)
        cam = (cam - lo) / (hi - lo + 1e-7)
    elif normalize == "max":
        cam = cam / (cam.reshape(cam.shape[0], -1).max(1).values.view(-1, 1, 1) + 1e-7)
    return cam.to(x.device)
