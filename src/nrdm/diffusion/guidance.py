"""From a network to the epsilon predictor that samplers consume, with classifier-free guidance.

Guidance acts on the network's prediction (all channels; of a learned-sigma network the first C):
    out = out_uncond + s (out_cond - out_uncond)
Both eps and v outputs are affine in the same x_t, so guiding the output guides eps. Two options:
- guidance interval (Kynkaanniemi et al. 2024): guide only at noise levels lo < sigma <= hi,
  sigma = sqrt((1 - abar) / abar); elsewhere one conditional pass (fewer network evaluations);
- CFG rescale (Lin et al. 2024): out_r = out * std(out_cond) / std(out) per sample, then
  phi out_r + (1 - phi) out, against the over-exposure of large guidance scales.
"""
from __future__ import annotations

import torch
from torch import nn

from nrdm.diffusion.samplers import EpsFn
from nrdm.models.blocks import prediction_part
from nrdm.models.conditions import concat, is_conditional, null_condition
from nrdm.diffusion.schedule import VPSchedule


def guided_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels, scale: float,
                  rescale: float = 0.0) -> torch.Tensor:
    """Conditional and unconditional pass in one batch, combined with guidance scale `scale`
    (and CFG rescale phi = `rescale`). labels: class labels or TextEmbeddings; the unconditional
    half gets model.null_condition."""
    null = null_condition(model, x.shape[0], x.device)
    out = prediction_part(model, model(torch.cat([x, x]), torch.cat([t, t]), concat(labels, null)))  # (2B, ...)
    cond, uncond = out.chunk(2)
    guided = uncond + scale * (cond - uncond)
    if rescale:
        dims = tuple(range(1, guided.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


def eps_predictor(model: nn.Module, schedule: VPSchedule, labels=None, cfg_scale: float = 1.0,
                  interval: tuple[float, float] | None = None, rescale: float = 0.0) -> EpsFn:
    """Wrap a backbone as eps_fn(x, t).

    labels: (B,) class indices or TextEmbeddings, or None for an unconditional model /
    unconditional sampling of a conditional one (model.null_condition is used). cfg_scale = 1 is
    plain conditional sampling (one network pass); any other value runs the guided pair in one
    batch, at the steps whose sigma lies in `interval` = (lo, hi] (None: every step).
    """
    conditional = is_conditional(model)
    if labels is not None and not conditional:
        raise ValueError("a condition was given but the model is unconditional (num_classes = 0, no text)")
    sigma = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()

    def plain(x, t):
        y = labels if labels is not None or not conditional else null_condition(model, x.shape[0], x.device)
        return prediction_part(model, model(x, t, y))

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guide = torch.full(t.shape, labels is not None and cfg_scale != 1.0)
        if interval is not None:
            s = sigma[t.cpu()]
            guide &= (s > interval[0]) & (s <= interval[1])
        if guide.all():
            out = guided_output(model, x, t, labels, cfg_scale, rescale)
        elif not guide.any():
            out = plain(x, t)
        else:                                              # steps inside and outside the interval
            mask = guide.to(x.device).view(-1, *[1] * (x.ndim - 1))
            out = torch.where(mask, guided_output(model, x, t, labels, cfg_scale, rescale), plain(x, t))
        return schedule.to_eps(out, x, t)

    return eps_fn
