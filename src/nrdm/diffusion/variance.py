"""The reverse step's variance, fixed or learned, and the variational bound that trains it.

Between two visited steps t > s (abar a_t < a_s; a_s = 1 after the last step) the forward process
has beta = 1 - a_t / a_s, and the true posterior q(x_s | x_t, x0) is Gaussian with

    mean = sqrt(a_s) beta / (1 - a_t) x0  +  sqrt(a_t / a_s) (1 - a_s) / (1 - a_t) x_t
    var  = beta~ = (1 - a_s) / (1 - a_t) beta

The reverse step p(x_s | x_t) takes that mean with x0 predicted, and a variance (Ho et al. 2020;
Nichol & Dhariwal 2021, "Improved DDPM"):
- fixed-small: beta~ (the posterior's own),  fixed-large: beta,
- learned: log var = f log beta + (1 - f) log beta~, f = (v + 1) / 2, with v in about [-1, 1] the
  second half of a learned-sigma network's channels (DiT's `learn_sigma`).
The learned variance is trained by the hybrid loss L_simple + w L_t (`vlb_term`): L_t is
KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the discretised decoder NLL
-log p(x0 | x1) for t = 0, in bits per dimension, with the mean's gradient stopped so that only
the variance learns from it. DiT trains with w = 1 (with T = 1000 this is Nichol & Dhariwal's
lambda = 0.001 on the sum over all steps).
"""
from __future__ import annotations

import math

import torch

VARIANCES = ("auto", "fixed-small", "fixed-large", "learned")


def posterior_mean(x0: torch.Tensor, xt: torch.Tensor, a_t, a_s) -> torch.Tensor:
    """Mean of q(x_s | x_t, x0); a_t, a_s floats or tensors broadcastable to x."""
    beta = 1 - a_t / a_s
    return (a_s ** 0.5 * beta / (1 - a_t)) * x0 + ((a_t / a_s) ** 0.5 * (1 - a_s) / (1 - a_t)) * xt


def log_variance_range(a_t: torch.Tensor, a_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log beta~, log beta) of the step t -> s: the ends of the learned variance's range. On the
    last step (a_s = 1) beta~ = 0 and its log is clamped at log 1e-20; that step adds no noise."""
    beta = 1 - a_t / a_s
    beta_tilde = (1 - a_s) / (1 - a_t) * beta
    return beta_tilde.clamp(min=1e-20).log(), beta.log()


def learned_log_variance(v: torch.Tensor, min_log: torch.Tensor, max_log: torch.Tensor) -> torch.Tensor:
    """log var = f max_log + (1 - f) min_log with f = (v + 1) / 2 (improved DDPM's interpolation)."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def step_log_variance(kind: str, a_t: torch.Tensor, a_s: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """log of the reverse step's variance for `kind` in fixed-small | fixed-large | learned."""
    min_log, max_log = log_variance_range(a_t, a_s)
    if kind == "fixed-small":
        return min_log
    if kind == "fixed-large":
        return max_log
    if kind == "learned":
        if v is None:
            raise ValueError("variance 'learned' needs a learned-sigma model (model.learn_sigma: true), whose "
                             "second C output channels are the variance; use fixed-small or fixed-large")
        return learned_log_variance(v, min_log, max_log)
    raise ValueError(f"unknown variance {kind!r}; allowed: {', '.join(VARIANCES)}")


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                             bin_width: float = 2 / 255) -> torch.Tensor:
    """-log P(x0) in nats, elementwise, for data on 256 levels in [-1, 1]: the mass of N(mean, e^(2
    log_scale)) on x0's bin [x0 - w/2, x0 + w/2], the outer bins reaching to -inf / +inf (Ho et al.
    2020, eq. 13). Data off the grid (latents) is scored by the bin around it, as DiT does."""
    normal = torch.distributions.Normal(mean, log_scale.exp())
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), normal.cdf(x0 + bin_width / 2))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), normal.cdf(x0 - bin_width / 2))
    return -(upper - lower).clamp(min=1e-12).log()


def vlb_term(x0: torch.Tensor, xt: torch.Tensor, x0_pred: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """L_t per sample, in bits per dimension, of the learned-variance reverse step at steps t (B,):
    the KL between the true posterior and p(x_{t-1} | x_t) for t > 0, the decoder NLL for t = 0.
    Pass x0_pred detached to train only the variance through it (the hybrid loss)."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    abar = alphas_cumprod.to(x0.device)
    a_t = abar[t].view(shape)
    a_s = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones_like(abar[t])).view(shape)
    min_log, max_log = log_variance_range(a_t, a_s)
    # at t = 0 beta~ = 0: the decoder's range starts at beta~ of t = 1 (DiT's "clipped" log variance)
    a_0, a_1 = abar[0], abar[1]
    decoder_min_log = ((1 - a_0) / (1 - a_1) * (1 - a_1 / a_0)).log()
    min_log = torch.where((t > 0).view(shape), min_log, decoder_min_log)
    log_var = learned_log_variance(v.float(), min_log.float(), max_log.float())
    mean = posterior_mean(x0_pred.float(), xt.float(), a_t.float(), a_s.float())
    true_mean = posterior_mean(x0.float(), xt.float(), a_t.float(), a_s.float())
    kl = normal_kl(true_mean, min_log.float(), mean, log_var).flatten(1).mean(1)
    nll = discretized_gaussian_nll(x0.float(), mean, 0.5 * log_var).flatten(1).mean(1)
    return torch.where(t > 0, kl, nll) / math.log(2.0)
