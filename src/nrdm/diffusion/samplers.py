"""Samplers: pure functions of (eps_fn, x_T, schedule, steps).

`eps_fn(x, t) -> eps` is any epsilon predictor (t: (B,) integer steps); samplers never see the
network. Build one from a model with `nrdm.diffusion.guidance.eps_predictor` (classifier-free
guidance included). Every sampler accepts any number of steps 1..T, visits the integer steps
`sampling_timesteps(schedule.sampling_start + 1, steps)` (from T-1, or for eps-prediction from
the last step whose abar is not too small to invert, see VPSchedule.sampling_start) and ends at
abar = 1 (clean data). Stochastic samplers draw their
noise from `generator`, so a seeded generator makes them deterministic.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from nrdm.diffusion.schedule import VPSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sampling_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The integer steps at which the network is evaluated, from T-1 down: round(T (1 - i/steps)) - 1
    for i = 0..steps-1, i.e. evenly spaced with the last interval ending at clean data (steps = T
    gives T-1, ..., 0; steps = 10 of T = 1000 gives 999, 899, ..., 99). Samplers pass
    T = schedule.sampling_start + 1."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    return [int(t) - 1 for t in np.round(np.linspace(num_timesteps, 0, steps + 1)[:-1])]


def _path(schedule: VPSchedule, steps: int):
    """(t, abar_t, abar_next) per step; abar_next = 1 on the last step. More steps than there are
    integer steps from the start down to 0 visit each of them once."""
    if not 1 <= steps <= schedule.num_timesteps:
        raise ValueError(f"steps must lie in [1, {schedule.num_timesteps}], got {steps}")
    ts = sampling_timesteps(schedule.sampling_start + 1, min(steps, schedule.sampling_start + 1))
    abar = schedule.alphas_cumprod
    nexts = [float(abar[t]) for t in ts[1:]] + [1.0]
    return [(t, float(abar[t]), a_next) for t, a_next in zip(ts, nexts)]


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn on the generator's device (so a CPU generator gives the same noise everywhere)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _steps(path, progress: bool, name: str):
    return tqdm(path, desc=name, disable=not progress, leave=False)


@torch.no_grad()
def sample_ddim(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int, eta: float = 0.0,
                generator: torch.Generator | None = None, progress: bool = False,
                clip_x0: float | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021). eta = 0: deterministic probability-flow discretisation;
    eta = 1: ancestral DDPM sampling. From step t to s (abar a_t -> a_s):

        x0  = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
        sig = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)
        x_s = sqrt(a_s) x0 + sqrt(1 - a_s - sig^2) eps + sig z

    clip_x0 = c clamps x0 to [-c, c] (data known to lie there) and re-derives eps from it.
    """
    for t, a_t, a_s in _steps(_path(schedule, steps), progress, "ddim" if eta == 0 else f"ddim eta={eta}"):
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
    return x


def sample_ddpm(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int,
                generator: torch.Generator | None = None, progress: bool = False,
                clip_x0: float | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling on any sub-sequence of steps: each step draws from the Gaussian
    posterior q(x_s | x_t, x0_hat), whose variance (1-a_s)/(1-a_t) (1 - a_t/a_s) is exactly DDIM's
    sigma^2 at eta = 1 (and DDPM's beta-tilde when steps = T)."""
    return sample_ddim(eps_fn, x, schedule, steps, eta=1.0, generator=generator, progress=progress, clip_x0=clip_x0)


@torch.no_grad()
def sample_dpmpp_2m(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int,
                    generator: torch.Generator | None = None, progress: bool = False,
                    clip_x0: float | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in the data prediction.

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma), h = lambda_s - lambda_t:
        D   = x0_t                                            (first step)
        D   = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, r = h_prev / h   (later steps)
        x_s = (sigma_s / sigma_t) x - alpha_s (exp(-h) - 1) D
    The last step (a_s = 1) returns the data prediction. `generator` is unused (deterministic).
    clip_x0 = c clamps the data prediction x0 to [-c, c].
    """
    x0_prev, h_prev = None, None
    for t, a_t, a_s in _steps(_path(schedule, steps), progress, "dpm++2m"):
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if a_s >= 1.0:
            return x0
        lam_t = 0.5 * math.log(a_t / (1 - a_t))
        lam_s = 0.5 * math.log(a_s / (1 - a_s))
        h = lam_s - lam_t
        if x0_prev is None:
            D = x0
        else:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = math.sqrt((1 - a_s) / (1 - a_t)) * x - math.sqrt(a_s) * math.expm1(-h) * D
        x0_prev, h_prev = x0, h
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++2m": sample_dpmpp_2m}


def sample(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, sampler: str = "dpm++2m", steps: int = 50,
           **kwargs) -> torch.Tensor:
    """Dispatch by name: "ddpm", "ddim" (kwarg eta), "dpm++2m"."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler](eps_fn, x, schedule, steps, **kwargs)
