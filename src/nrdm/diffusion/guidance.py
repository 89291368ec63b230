"""From a network to the epsilon predictor that samplers consume, with classifier-free guidance.

Guidance acts on the whole network output (all channels):
    out = out_uncond + s (out_cond - out_uncond)
Both eps and v outputs are affine in the same x_t, so guiding the output guides eps.
"""
from __future__ import annotations

import torch
from torch import nn

from nrdm.diffusion.samplers import EpsFn
from nrdm.models.conditions import concat, is_conditional, null_condition
from nrdm.diffusion.schedule import VPSchedule


def guided_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels, scale: float) -> torch.Tensor:
    """Conditional and unconditional pass in one batch, combined with guidance scale `scale`.
    labels: class labels or TextEmbeddings; the unconditional half gets model.null_condition."""
    null = null_condition(model, x.shape[0], x.device)
    out = model(torch.cat([x, x]), torch.cat([t, t]), concat(labels, null))   # (2B, ...)
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def eps_predictor(model: nn.Module, schedule: VPSchedule, labels=None, cfg_scale: float = 1.0) -> EpsFn:
    """Wrap a backbone as eps_fn(x, t).

    labels: (B,) class indices or TextEmbeddings, or None for an unconditional model /
    unconditional sampling of a conditional one (model.null_condition is used). cfg_scale = 1 is
    plain conditional sampling (one network pass); any other value runs the guided pair in one
    batch.
    """
    conditional = is_conditional(model)
    if labels is not None and not conditional:
        raise ValueError("a condition was given but the model is unconditional (num_classes = 0, no text)")

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if labels is not None and cfg_scale != 1.0:
            out = guided_output(model, x, t, labels, cfg_scale)
        else:
            y = labels if labels is not None or not conditional else null_condition(model, x.shape[0], x.device)
            out = model(x, t, y)
        return schedule.to_eps(out, x, t)

    return eps_fn
