"""Discrete variance-preserving diffusion: x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps, n = 0..T-1.

The network's output is an epsilon prediction or a v prediction (v = sqrt(abar) eps - sqrt(1-abar) x_0);
`to_eps` / `to_x0` convert either into what samplers use.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal")
# Smallest abar an eps-prediction sampler starts from: the terminal abar of DDPM's linear
# schedule (4.04e-5 at T = 1000), from which eps-models have always been sampled.
MIN_EPS_START_ABAR = 4e-5


def _betas(kind: str, num_timesteps: int) -> torch.Tensor:
    if kind == "linear":   # DDPM (Ho et al. 2020), scaled to T as in improved DDPM
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if kind == "cosine":   # improved DDPM (Nichol & Dhariwal 2021): abar(s) = cos^2((s + 0.008)/1.008 * pi/2)
        s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")


class VPSchedule:
    """Noise schedule with T discrete steps; all tables in float64, cast on lookup."""

    def __init__(self, kind: str = "linear", num_timesteps: int = 1000, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        self.kind, self.num_timesteps, self.prediction = kind, num_timesteps, prediction
        self.betas = _betas(kind, num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)              # abar_n

    @property
    def sampling_start(self) -> int:
        """The step samplers start from (x_T ~ N(0, I) stands for the marginal there).

        eps-prediction turns the output into x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): eps errors
        are amplified by 1/sqrt(abar). The cosine schedule ends at abar[T-1] = 2.4e-9, 1000x below
        abar[T-2] (its last beta is clipped at 0.999): a first step from there multiplies eps errors
        by ~600 (50 steps) to ~3000 (10 steps), which the x0 clamp hides for pixels but not for
        latents. eps-models therefore start at the last step with abar >= MIN_EPS_START_ABAR (the
        linear schedule's own end, so linear is unchanged; cosine starts at 994): there x_T and
        the true marginal differ by sqrt(abar) x0 <= 0.6% of the data. v-prediction (x0 =
        sqrt(abar) x - sqrt(1 - abar) v) is well conditioned at any abar and starts at T-1.
        """
        if self.prediction == "v":
            return self.num_timesteps - 1
        invertible = int((self.alphas_cumprod >= MIN_EPS_START_ABAR).sum())     # abar decreases in n
        return invertible - 1 if invertible else self.num_timesteps - 1

    @property
    def log_snr(self) -> torch.Tensor:
        """log SNR_n = log(abar_n / (1 - abar_n)), (T,) float64, decreasing in n."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    def timestep_density(self, kind: str = "uniform", mean: float = 0.0, std: float = 1.0) -> torch.Tensor | None:
        """Probabilities (T,) of drawing each step for training; None for uniform.

        logit-normal (Esser et al. 2024, SD3) draws t = sigmoid(u), u ~ N(m, s), for rectified flow,
        whose SNR is ((1 - t) / t)^2: log-SNR = -2u ~ N(-2m, 2s). We keep that density of noise
        levels and give each discrete step the probability of the log-SNR interval it is nearest
        to (cells bounded by the midpoints of neighbouring steps' log-SNR; the end cells open)."""
        if kind not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {kind!r}; allowed: {', '.join(TIMESTEP_SAMPLINGS)}")
        if kind == "uniform":
            return None
        if std <= 0:
            raise ValueError(f"diffusion.logit_std must be > 0, got {std}")
        lam = self.log_snr
        edges = torch.cat([lam.new_tensor([math.inf]), (lam[1:] + lam[:-1]) / 2, lam.new_tensor([-math.inf])])
        normal = torch.distributions.Normal(torch.tensor(-2.0 * mean, dtype=torch.float64),
                                            torch.tensor(2.0 * std, dtype=torch.float64))
        cdf = normal.cdf(edges)                                      # decreasing along n
        return (cdf[:-1] - cdf[1:]).clamp_min(0)

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar at integer steps t (B,), shaped (B, 1, ..., 1) to broadcast against `like`."""
        a = self.alphas_cumprod.to(t.device)[t.long()].to(like.dtype)
        return a.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023) per-sample weight of this schedule's MSE, (B,) float32:
        the x0-space weight min(SNR, gamma) divided by what the target's MSE already carries,
        SNR for eps (||eps - eps^||^2 = SNR ||x0 - x0^||^2) and SNR + 1 for v."""
        snr = (self.alphas_cumprod / (1 - self.alphas_cumprod)).to(t.device)[t.long()]
        carried = snr if self.prediction == "eps" else snr + 1
        return (snr.clamp(max=gamma) / carried).float()

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output."""
        if self.prediction == "eps":
            return noise
        a = self.abar(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def to_eps(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return output
        a = self.abar(t, x)
        return a.sqrt() * output + (1 - a).sqrt() * x          # eps = sqrt(a) v + sqrt(1-a) x_t

    def to_x0(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x)
        if self.prediction == "eps":
            return (x - (1 - a).sqrt() * output) / a.sqrt()
        return a.sqrt() * x - (1 - a).sqrt() * output           # x0 = sqrt(a) x_t - sqrt(1-a) v

    def __repr__(self) -> str:
        return f"VPSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}, prediction={self.prediction!r})"
