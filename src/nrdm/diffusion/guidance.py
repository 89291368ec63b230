"""From a network to the epsilon predictor that samplers consume, with classifier-free guidance.

Guidance acts on the network's prediction (all channels; of a learned-sigma network the first C,
the variance values being the conditional pass's, as in DiT):
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
from nrdm.models.blocks import split_output
from nrdm.models.conditions import concat, is_conditional, null_condition
from nrdm.diffusion.schedule import VPSchedule


def in_guidance_interval(sigma: torch.Tensor, interval: tuple[float, float] | None) -> torch.Tensor:
    """Whether each noise level sigma = sqrt((1 - abar) / abar) lies in the guidance interval
    (lo, hi] (everywhere when interval is None)."""
    if interval is None:
        return torch.ones_like(sigma, dtype=torch.bool)
    return (sigma > interval[0]) & (sigma <= interval[1])


def _guided_pair(model: nn.Module, x: torch.Tensor, t: torch.Tensor, condition, scale: float,
                 rescale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(guided prediction, the conditional half's variance values or None): the conditional and
    unconditional pass in one batch; a learned variance is not guided (DiT takes the conditional one)."""
    null = null_condition(model, x.shape[0], x.device)
    out, variance = split_output(model, model(torch.cat([x, x]), torch.cat([t, t]), concat(condition, null)))  # (2B, ...)
    cond, uncond = out.chunk(2)
    guided = uncond + scale * (cond - uncond)
    if rescale:
        dims = tuple(range(1, guided.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided, None if variance is None else variance.chunk(2)[0]


def guided_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, condition, scale: float,
                  rescale: float = 0.0) -> torch.Tensor:
    """Conditional and unconditional pass in one batch, combined with guidance scale `scale`
    (and CFG rescale phi = `rescale`). condition: class labels or TextEmbeddings; the unconditional
    half gets model.null_condition."""
    return _guided_pair(model, x, t, condition, scale, rescale)[0]


def model_prediction(model: nn.Module, x: torch.Tensor, t: torch.Tensor, condition=None, scale: float = 1.0,
                     rescale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance values or None) of the network at (x, t): guided when condition are given
    and scale != 1, else one pass (condition None: the null condition of a conditional model)."""
    if condition is not None and scale != 1.0:
        return _guided_pair(model, x, t, condition, scale, rescale)
    if condition is None and is_conditional(model):
        condition = null_condition(model, x.shape[0], x.device)
    return split_output(model, model(x, t, condition))


def eps_predictor(model: nn.Module, schedule: VPSchedule, condition=None, cfg_scale: float = 1.0,
                  interval: tuple[float, float] | None = None, rescale: float = 0.0,
                  with_variance: bool = False) -> EpsFn:
    """Wrap a backbone as eps_fn(x, t).

    condition: (B,) class indices or TextEmbeddings, or None for an unconditional model /
    unconditional sampling of a conditional one (model.null_condition is used). cfg_scale = 1 is
    plain conditional sampling (one network pass); any other value runs the guided pair in one
    batch, at the steps whose sigma lies in `interval` = (lo, hi] (None: every step).
    with_variance: eps_fn returns (eps, v), v the variance values of a learned-sigma model (None
    for others), for DDPM's learned variance.
    """
    if condition is not None and not is_conditional(model):
        raise ValueError("a condition was given but the model is unconditional (num_classes = 0, no text)")
    sigma = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()

    def eps_fn(x: torch.Tensor, t: torch.Tensor):
        guide = torch.full(t.shape, condition is not None and cfg_scale != 1.0)
        guide &= in_guidance_interval(sigma[t.cpu()], interval)
        if guide.all():
            out, variance = _guided_pair(model, x, t, condition, cfg_scale, rescale)
        elif not guide.any():
            out, variance = model_prediction(model, x, t, condition)
        else:                                              # steps inside and outside the interval
            mask = guide.to(x.device).view(-1, *[1] * (x.ndim - 1))
            (g_out, g_var) = _guided_pair(model, x, t, condition, cfg_scale, rescale)
            (p_out, p_var) = model_prediction(model, x, t, condition)
            out = torch.where(mask, g_out, p_out)
            variance = None if p_var is None else torch.where(mask, g_var, p_var)
        eps = schedule.to_eps(out, x, t)
        return (eps, variance) if with_variance else eps

    return eps_fn
