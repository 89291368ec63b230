"""From a network to the epsilon predictor that samplers consume, with classifier-free guidance.

Guidance acts on the whole network output (all channels):
    out = out_uncond + s (out_cond - out_uncond)
Both eps and v outputs are affine in the same x_t, so guiding the output guides eps.
"""
from __future__ import annotations

import torch
from torch import nn

from nrdm.diffusion.samplers import EpsFn
from nrdm.diffusion.schedule import VPSchedule


def guided_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                  scale: float, null_class: int) -> torch.Tensor:
    """Conditional and unconditional pass in one batch, combined with guidance scale `scale`."""
    null = torch.full_like(labels, null_class)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))   # (2B, C, H, W)
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def eps_predictor(model: nn.Module, schedule: VPSchedule, labels: torch.Tensor | None = None,
                  cfg_scale: float = 1.0) -> EpsFn:
    """Wrap a backbone as eps_fn(x, t).

    labels: (B,) class indices, or None for an unconditional model / unconditional sampling of a
    conditional one (the null class is used). cfg_scale = 1 is plain conditional sampling (one
    network pass); any other value runs the guided pair in one batch.
    """
    num_classes = getattr(model, "num_classes", 0)
    if labels is not None and num_classes == 0:
        raise ValueError("labels were given but the model is unconditional (num_classes = 0)")

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = labels
        if num_classes and y is None:
            y = torch.full((x.shape[0],), num_classes, device=x.device, dtype=torch.long)
        if y is not None and cfg_scale != 1.0 and labels is not None:
            out = guided_output(model, x, t, y, cfg_scale, num_classes)
        else:
            out = model(x, t, y)
        return schedule.to_eps(out, x, t)

    return eps_fn
