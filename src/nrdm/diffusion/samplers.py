"""Samplers: pure functions of (eps_fn, x_T, schedule, steps).

`eps_fn(x, t) -> eps` is any epsilon predictor (t: (B,) integer steps); samplers never see the
network. Build one from a model with `nrdm.diffusion.guidance.eps_predictor` (classifier-free
guidance included). Every sampler accepts any number of steps 1..T and a `spacing` of them
(`step_sequence`: from T-1, or for eps-prediction from the last step whose abar is not too small
to invert, see VPSchedule.sampling_start) and ends at abar = 1 (clean data). Stochastic samplers
draw their noise from `generator`, so a seeded generator makes them deterministic.

DDIM, DDPM and DPM-Solver++(2M) work in the VP variables (x_t = sqrt(a) x0 + sqrt(1 - a) eps).
The samplers of k-diffusion's family (Euler ancestral, DPM-Solver++(2M/3M) SDE, EDM's Heun) work
in the variance-exploding ones, x = x_t / sqrt(a) = x0 + sigma eps with sigma = sqrt((1 - a) / a),
where the denoiser is D(x, sigma) = x - sigma eps (see `_denoiser`).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from nrdm.diffusion.schedule import VPSchedule
from nrdm.diffusion.variance import VARIANCES, posterior_mean, step_log_variance

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sampling_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The integer steps at which the network is evaluated, from T-1 down: round(T (1 - i/steps)) - 1
    for i = 0..steps-1, i.e. evenly spaced with the last interval ending at clean data (steps = T
    gives T-1, ..., 0; steps = 10 of T = 1000 gives 999, 899, ..., 99). Samplers pass
    T = schedule.sampling_start + 1."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    return [int(t) - 1 for t in np.round(np.linspace(num_timesteps, 0, steps + 1)[:-1])]


SPACINGS = ("uniform", "trailing", "leading", "karras", "logsnr")


def step_sequence(schedule: VPSchedule, steps: int, spacing: str = "uniform", rho: float = 7.0) -> list[int]:
    """The integer steps (strictly decreasing, the first <= schedule.sampling_start = S) at which a
    sampler evaluates the network; after the last one it steps to clean data.

    - uniform: evenly spaced in time, the last interval ending at clean data (sampling_timesteps):
      round((S+1)(1 - k/steps)) - 1; "trailing" is diffusers' name for the same sequence
    - leading: diffusers' "leading", k * ((S+1) // steps) for k = steps-1 .. 0 (ends at step 0)
    - karras: sigma_i = (smax^(1/rho) + i/(steps-1) (smin^(1/rho) - smax^(1/rho)))^rho, the
      noise levels of Karras et al. 2022 (rho = 7) between the start's and step 0's sigma
    - logsnr: evenly spaced in log-SNR between the start's and step 0's
    karras and logsnr take, for each level, the step nearest in log-sigma; where two levels round
    to the same step (many steps at low noise) it is visited once, so they may give fewer steps."""
    start = schedule.sampling_start
    if not 1 <= steps <= start + 1:
        raise ValueError(f"steps must lie in [1, {start + 1}], got {steps}")
    if spacing in ("uniform", "trailing"):
        return sampling_timesteps(start + 1, steps)
    if spacing == "leading":
        ts = (np.arange(steps) * ((start + 1) // steps))[::-1]
    elif spacing in ("karras", "logsnr"):
        log_sigma = 0.5 * (torch.log1p(-schedule.alphas_cumprod) - torch.log(schedule.alphas_cumprod)).numpy()
        hi, lo = log_sigma[start], log_sigma[0]
        if spacing == "karras":
            ramp = np.linspace(0, 1, steps)
            levels = rho * np.log(np.exp(hi / rho) + ramp * (np.exp(lo / rho) - np.exp(hi / rho)))
        else:
            levels = np.linspace(hi, lo, steps)
        ts = np.abs(log_sigma[None, :start + 1] - levels[:, None]).argmin(1)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    return [int(t) for t in dict.fromkeys(ts.tolist()) if t <= start]       # unique, order kept


def _path(schedule: VPSchedule, steps: int, spacing: str = "uniform"):
    """(t, abar_t, abar_next) per step; abar_next = 1 on the last step. More steps than there are
    integer steps from the start down to 0 visit each of them once."""
    if not 1 <= steps <= schedule.num_timesteps:
        raise ValueError(f"steps must lie in [1, {schedule.num_timesteps}], got {steps}")
    ts = step_sequence(schedule, min(steps, schedule.sampling_start + 1), spacing)
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
                clip_x0: float | None = None, spacing: str = "uniform") -> torch.Tensor:
    """DDIM (Song et al. 2021). eta = 0: deterministic probability-flow discretisation;
    eta = 1: ancestral DDPM sampling. From step t to s (abar a_t -> a_s):

        x0  = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
        sig = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)
        x_s = sqrt(a_s) x0 + sqrt(1 - a_s - sig^2) eps + sig z

    clip_x0 = c clamps x0 to [-c, c] (data known to lie there) and re-derives eps from it.
    """
    for t, a_t, a_s in _steps(_path(schedule, steps, spacing), progress, "ddim" if eta == 0 else f"ddim eta={eta}"):
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


@torch.no_grad()
def sample_ddpm(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int, variance: str = "fixed-small",
                generator: torch.Generator | None = None, progress: bool = False,
                clip_x0: float | None = None, spacing: str = "uniform") -> torch.Tensor:
    """Ancestral DDPM sampling on any sub-sequence of steps (respaced as in improved DDPM: between
    visited steps t -> s, beta = 1 - a_t / a_s). Each step draws x_s ~ N(mean, var) with the
    posterior mean of the predicted x0 (`variance.posterior_mean`) and var by `variance`:
    fixed-small beta~ = (1 - a_s)/(1 - a_t) beta (the true posterior's, DDIM's sigma^2 at eta = 1;
    DDPM's beta~ when steps = T), fixed-large beta, or learned (improved DDPM / DiT: eps_fn returns
    (eps, v) and log var = f log beta + (1 - f) log beta~, f = (v + 1) / 2; see
    guidance.eps_predictor(with_variance=True)). The last step (to clean data) adds no noise."""
    if variance not in VARIANCES[1:]:
        raise ValueError(f"unknown DDPM variance {variance!r}; allowed: {', '.join(VARIANCES[1:])}")
    learned = variance == "learned"
    for t, a_t, a_s in _steps(_path(schedule, steps, spacing), progress, "ddpm"):
        out = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        eps, v = out if learned else (out, None)
        if learned and not isinstance(out, tuple):
            raise ValueError("variance 'learned' needs eps_fn to return (eps, v): build it with "
                             "eps_predictor(..., with_variance=True) from a learned-sigma model")
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        x_next = posterior_mean(x0, x, a_t, a_s)
        if a_s < 1.0:
            log_var = step_log_variance(variance, torch.tensor(a_t, dtype=torch.float64),
                                        torch.tensor(a_s, dtype=torch.float64), v)
            x_next = x_next + (0.5 * log_var).exp().to(x.dtype) * _randn_like(x, generator)
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int,
                    generator: torch.Generator | None = None, progress: bool = False,
                    clip_x0: float | None = None, spacing: str = "uniform") -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in the data prediction.

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma), h = lambda_s - lambda_t:
        D   = x0_t                                            (first step)
        D   = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev, r = h_prev / h   (later steps)
        x_s = (sigma_s / sigma_t) x - alpha_s (exp(-h) - 1) D
    The last step (a_s = 1) returns the data prediction. `generator` is unused (deterministic).
    clip_x0 = c clamps the data prediction x0 to [-c, c].
    """
    x0_prev, h_prev = None, None
    for t, a_t, a_s in _steps(_path(schedule, steps, spacing), progress, "dpm++2m"):
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


# ------------------------------------------------------------------------------------------
# k-diffusion's family, in variance-exploding variables x = x0 + sigma eps
# ------------------------------------------------------------------------------------------

def _sigma_path(schedule: VPSchedule, steps: int, spacing: str) -> tuple[list[int], list[float]]:
    """(integer steps t_i, sigmas sigma_i of those steps followed by 0)."""
    path = _path(schedule, steps, spacing)
    sigmas = [math.sqrt((1 - a_t) / a_t) for _, a_t, _ in path] + [0.0]
    return [t for t, _, _ in path], sigmas


def _denoiser(eps_fn: EpsFn, schedule: VPSchedule, clip_x0: float | None):
    """D(x, sigma) = x0 predicted from x = x0 + sigma eps: the network sees the VP input
    x / sqrt(1 + sigma^2) at the integer step nearest to sigma in log-sigma (exactly the step when
    sigma is one of the path's), and D = x - sigma eps (re-derived after clamping x0)."""
    log_sigma = 0.5 * (torch.log1p(-schedule.alphas_cumprod) - torch.log(schedule.alphas_cumprod))

    def D(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = int((log_sigma - math.log(sigma)).abs().argmin())
        eps = eps_fn(x / math.sqrt(1 + sigma ** 2), torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = x - sigma * eps
        return x0.clamp(-clip_x0, clip_x0) if clip_x0 is not None else x0

    return D


def _ve_start(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_T ~ N(0, I) of the VP process, in VE variables (x_T / sqrt(abar))."""
    return x * math.sqrt(1 + sigma ** 2)


@torch.no_grad()
def sample_euler_ancestral(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int, eta: float = 1.0,
                           generator: torch.Generator | None = None, progress: bool = False,
                           clip_x0: float | None = None, spacing: str = "uniform") -> torch.Tensor:
    """Euler ancestral (k-diffusion): from sigma to sigma', split sigma' into the deterministic part
    sigma_d = sqrt(sigma'^2 - sigma_u^2) and fresh noise sigma_u = min(sigma', eta sigma'
    sqrt(1 - sigma'^2 / sigma^2)); an Euler step of dx/dsigma = (x - D) / sigma to sigma_d, then
    + sigma_u z. eta = 1 is ancestral sampling, eta = 0 the Euler ODE step."""
    ts, sigmas = _sigma_path(schedule, steps, spacing)
    D = _denoiser(eps_fn, schedule, clip_x0)
    x = _ve_start(x, sigmas[0])
    for i in _steps(range(len(ts)), progress, "euler-a"):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = D(x, sigma)
        up = min(nxt, eta * nxt * math.sqrt(max(0.0, 1 - nxt ** 2 / sigma ** 2)))
        down = math.sqrt(max(nxt ** 2 - up ** 2, 0.0))
        x = denoised + (down / sigma) * (x - denoised)             # Euler to sigma_d: x + (sigma_d - sigma) d
        if up > 0:
            x = x + up * _randn_like(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int, eta: float = 1.0,
                        generator: torch.Generator | None = None, progress: bool = False,
                        clip_x0: float | None = None, spacing: str = "uniform") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion's midpoint form). With lambda = -log sigma,
    h = lambda' - lambda and eta h the share of the step taken as fresh noise:
        x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-(1+eta) h}) D
             + (1/2)(1 - e^{-(1+eta) h}) (D - D_prev) / r            (r = h_prev / h; not on the first step)
             + sigma' sqrt(1 - e^{-2 eta h}) z
    eta = 0 is the deterministic DPM-Solver++(2M); the step to sigma = 0 returns D (first order:
    the final step is lower order, as Lu et al. recommend)."""
    ts, sigmas = _sigma_path(schedule, steps, spacing)
    D = _denoiser(eps_fn, schedule, clip_x0)
    x = _ve_start(x, sigmas[0])
    old, h_last = None, None
    for i in _steps(range(len(ts)), progress, "dpm++2m-sde"):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = D(x, sigma)
        if nxt == 0:
            return denoised
        h = math.log(sigma / nxt)
        decay = -math.expm1(-(1 + eta) * h)                        # 1 - e^{-(1+eta) h}
        x = (nxt / sigma) * math.exp(-eta * h) * x + decay * denoised
        if old is not None:
            x = x + 0.5 * decay * (h / h_last) * (denoised - old)
        if eta > 0:
            x = x + nxt * math.sqrt(-math.expm1(-2 * eta * h)) * _randn_like(x, generator)
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int, eta: float = 1.0,
                        generator: torch.Generator | None = None, progress: bool = False,
                        clip_x0: float | None = None, spacing: str = "uniform") -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's form). With h_eta = (1 + eta) h:
        x' = e^{-h_eta} x + (1 - e^{-h_eta}) D + phi2 d1 - phi3 d2 + sigma' sqrt(1 - e^{-2 eta h}) z
    phi2 = (e^{-h_eta} - 1)/h_eta + 1, phi3 = phi2 / h_eta - 1/2, and d1, d2 the first and second
    divided differences of the last three D (second order on the second step, first order on
    the first). Below 15 steps the last two steps drop to second and first order (Lu et al.)."""
    ts, sigmas = _sigma_path(schedule, steps, spacing)
    D = _denoiser(eps_fn, schedule, clip_x0)
    x = _ve_start(x, sigmas[0])
    history: list[tuple[torch.Tensor, float]] = []                 # (D, h) of earlier steps, newest first
    n = len(ts)
    for i in _steps(range(n), progress, "dpm++3m-sde"):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = D(x, sigma)
        if nxt == 0:
            return denoised
        h = math.log(sigma / nxt)
        h_eta = (1 + eta) * h
        order = min(len(history) + 1, 3, n - i if n < 15 else 3)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi2 = math.expm1(-h_eta) / h_eta + 1
        if order == 3:
            (d_1, h_1), (d_2, h_2) = history[0], history[1]
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi2 * d1 - (phi2 / h_eta - 0.5) * d2
        elif order == 2:
            d_1, h_1 = history[0]
            x = x + phi2 * (denoised - d_1) / (h_1 / h)
        if eta > 0:
            x = x + nxt * math.sqrt(-math.expm1(-2 * eta * h)) * _randn_like(x, generator)
        history = [(denoised, h)] + history[:1]
    return x


@torch.no_grad()
def sample_heun(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                generator: torch.Generator | None = None, progress: bool = False,
                clip_x0: float | None = None, spacing: str = "uniform") -> torch.Tensor:
    """EDM's stochastic second-order sampler (Karras et al. 2022, Algorithm 2). At sigma_i in
    [s_tmin, s_tmax] the noise is first raised to sigma_hat = (1 + g) sigma_i, g = min(s_churn /
    steps, sqrt(2) - 1), by adding s_noise sqrt(sigma_hat^2 - sigma_i^2) z; then an Euler step of
    dx/dsigma = (x - D) / sigma to sigma_{i+1}, corrected by the trapezoid rule (Heun) except on
    the step to sigma = 0. s_churn = 0 is the deterministic Heun sampler. 2 steps - 1 network
    evaluations."""
    ts, sigmas = _sigma_path(schedule, steps, spacing)
    D = _denoiser(eps_fn, schedule, clip_x0)
    x = _ve_start(x, sigmas[0])
    g_max = min(s_churn / len(ts), math.sqrt(2) - 1)
    for i in _steps(range(len(ts)), progress, "heun"):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        gamma = g_max if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2) * _randn_like(x, generator)
        d = (x - D(x, sigma_hat)) / sigma_hat
        x_next = x + (nxt - sigma_hat) * d
        if nxt > 0:
            d_next = (x_next - D(x_next, nxt)) / nxt
            x_next = x + (nxt - sigma_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


@torch.no_grad()
def sample_unipc(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, steps: int, order: int = 2,
                 generator: torch.Generator | None = None, progress: bool = False,
                 clip_x0: float | None = None, spacing: str = "uniform") -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction with B(h) = e^h - 1 ("bh2"): a multistep predictor
    UniP-p and a corrector UniC-p that reuses the network evaluation at the predicted point, so
    a step costs one evaluation and the corrected scheme has order p + 1.

    With lambda = log(alpha / sigma), h = lambda' - lambda, earlier data predictions m_k at
    r_k = (lambda_k - lambda) / h, D_k = (m_k - m) / r_k, phi_1 = e^{-h} - 1:
        x'  = (sigma'/sigma) x - alpha' phi_1 m - alpha' B(h) sum_k rho_k D_k           (UniP)
        x'c = (sigma'/sigma) x - alpha' phi_1 m - alpha' B(h) (sum_k rho^c_k D_k + rho^c_p (m' - m))   (UniC)
    the rho solving R rho = b with R_jk = r_k^j and b_j = j! phi_{j+1}(h) / B(h) (rho = 1/2 at
    order 2). The first steps warm up from order 1 and the last ones drop order (step i of n uses
    at most n - i, as diffusers' UniPC); the step to clean data returns the data prediction,
    uncorrected. `generator` is unused."""
    path = _path(schedule, steps, spacing)
    n = len(path)
    lam = lambda a: 0.5 * math.log(a / (1 - a))
    history: list[tuple[torch.Tensor, float]] = []              # (data prediction, lambda), newest last
    x_prev = None

    def x0_of(x, t, a):
        eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return x0.clamp(-clip_x0, clip_x0) if clip_x0 is not None else x0

    def update(x, a_s, a_t, m0, lam_s, lam_t, older, m_new=None):
        """UniP (m_new None) or UniC from (x, a_s) with data prediction m0 to a_t."""
        h = lam_t - lam_s
        hh = -h
        rks = [(l_k - lam_s) / h for _, l_k in older]
        diffs = [(m_k - m0) / r for (m_k, _), r in zip(older, rks)]
        rks.append(1.0)
        phi_1 = math.expm1(hh)
        B_h = math.expm1(hh)
        R, b, h_phi_k, factorial = [], [], phi_1 / hh - 1, 1
        for j in range(1, len(rks) + 1):
            R.append([r ** (j - 1) for r in rks])
            b.append(h_phi_k * factorial / B_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        out = math.sqrt((1 - a_t) / (1 - a_s)) * x - math.sqrt(a_t) * phi_1 * m0
        if m_new is None:                                             # predictor over the older outputs
            if diffs:
                rho = [0.5] if len(diffs) == 1 else np.linalg.solve(np.array(R)[:-1, :-1], np.array(b)[:-1]).tolist()
                out = out - math.sqrt(a_t) * B_h * sum(r * d for r, d in zip(rho, diffs))
            return out
        rho = [0.5] if not diffs else np.linalg.solve(np.array(R), np.array(b)).tolist()
        correction = sum(r * d for r, d in zip(rho[:-1], diffs)) + rho[-1] * (m_new - m0)
        return out - math.sqrt(a_t) * B_h * correction

    for i, (t, a_t, a_next) in enumerate(_steps(path, progress, "unipc")):
        m = x0_of(x, t, a_t)
        if x_prev is not None:                                        # correct the last step with m
            (m0, lam_0), older_c = history[-1], history[-1 - c_order + 1:-1][::-1] if c_order > 1 else []
            x = update(x_prev, a_prev, a_t, m0, lam_0, lam(a_t), older_c, m_new=m)
        if a_next >= 1.0:
            return m
        history.append((m, lam(a_t)))
        p = min(order, len(history), n - i)                              # usable order of this step
        older = history[-p:-1][::-1] if p > 1 else []
        x_prev, a_prev, c_order = x, a_t, p
        x = update(x, a_t, a_next, m, lam(a_t), lam(a_next), older)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++2m": sample_dpmpp_2m, "euler-a": sample_euler_ancestral,
            "dpm++2m-sde": sample_dpmpp_2m_sde, "dpm++3m-sde": sample_dpmpp_3m_sde, "heun": sample_heun,
            "unipc": sample_unipc}


def sample(eps_fn: EpsFn, x: torch.Tensor, schedule: VPSchedule, sampler: str = "dpm++2m", steps: int = 50,
           **kwargs) -> torch.Tensor:
    """Dispatch by name (see SAMPLERS). Keyword options a sampler does not take (eta for a
    deterministic solver, s_churn for any but heun) and options given as None are left out, so
    one set of sample settings drives every sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    fn = SAMPLERS[sampler]
    accepted = inspect.signature(fn).parameters
    return fn(eps_fn, x, schedule, steps, **{k: v for k, v in kwargs.items() if k in accepted and v is not None})
