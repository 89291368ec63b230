"""Toy lab with exact ground truth: low-dimensional distributions we can sample without limit,
denoised by a deep stack of the same gated units the image backbones use (MLP branches).

The quality metric is the energy distance between generated samples and fresh true samples; its
floor is the energy distance between two independent true sample sets of the same size.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from nrdm.models.blocks import wants_input_conditioning
from nrdm.models.gated_unit import Conditioning, GatedResidual, UnitConfig
from nrdm.models.layers import Mlp, TimestepEmbedder

TOY_DATASETS = ("gmm2d", "moons", "gmm16")


def sample_toy(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples (n, d) of a toy distribution, scaled to roughly unit variance per axis.

    gmm2d: 8 equal Gaussians (std 0.1) on a circle of radius 1.4;
    moons: two interleaved half circles with Gaussian noise 0.05 (scikit-learn's construction);
    gmm16: 10 equal Gaussians (std 0.15) in 16-D with means drawn once from a fixed seed.
    """
    if name == "gmm2d":
        k = torch.randint(0, 8, (n,), generator=generator)
        angle = 2 * math.pi * k.float() / 8
        centres = 1.4 * torch.stack([angle.cos(), angle.sin()], dim=1)
        return centres + 0.1 * torch.randn(n, 2, generator=generator)
    if name == "moons":
        upper = torch.rand(n, generator=generator) < 0.5
        t = math.pi * torch.rand(n, generator=generator)
        x = torch.where(upper, t.cos(), 1 - t.cos())
        y = torch.where(upper, t.sin(), 0.5 - t.sin())
        points = torch.stack([x, y], dim=1) + 0.05 * torch.randn(n, 2, generator=generator)
        return (points - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])
    if name == "gmm16":
        means = torch.randn(10, 16, generator=torch.Generator().manual_seed(1234))
        k = torch.randint(0, 10, (n,), generator=generator)
        return means[k] + 0.15 * torch.randn(n, 16, generator=generator)
    raise ValueError(f"unknown toy dataset {name!r}; allowed: {', '.join(TOY_DATASETS)}")


def toy_dim(name: str) -> int:
    return 16 if name == "gmm16" else 2


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely), with the unbiased within-set means."""
    def mean_dist(a, b, same):
        d = torch.cdist(a.double(), b.double())
        if same:
            n = len(a)
            return float(d.sum() / (n * (n - 1)))
        return float(d.mean())
    return 2 * mean_dist(x, y, False) - mean_dist(x, x, True) - mean_dist(y, y, True)


class ToyDenoiser(nn.Module):
    """x (B, d) -> Linear -> `depth` gated MLP units -> LayerNorm -> Linear -> eps (B, d).

    Same interface as the image backbones (forward(x, t, labels=None)), unconditional; the time
    embedding is the conditioning vector c of every unit's gates, and is added to the input
    features for variants whose gates do not see it (as `input_conditioning="auto"` does in the
    image backbones).
    """

    num_classes = 0

    def __init__(self, dim: int = 2, width: int = 64, depth: int = 8, mlp_ratio: float = 2.0,
                 unit: UnitConfig | str = "nrdm", num_timesteps: int = 1000):
        super().__init__()
        self.in_channels, self.dim, self.num_timesteps = dim, dim, num_timesteps
        self.unit = UnitConfig.parse(unit)
        self.time = TimestepEmbedder(width)
        self.stem = nn.Linear(dim, width)
        self.cond_in = nn.Linear(width, width) if wants_input_conditioning("auto", self.unit) else None
        norm = lambda affine: nn.LayerNorm(width, elementwise_affine=affine)    # noqa: E731
        self.units = nn.ModuleList(GatedResidual(Mlp(width, mlp_ratio), width, width, self.unit, norm)
                                   for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.time(t)                                                    # (B, W)
        cond = Conditioning(c, 2.0 * t.float() / self.num_timesteps - 1.0)
        z = self.stem(x)                                                    # (B, W)
        if self.cond_in is not None:
            z = z + self.cond_in(c)
        for unit in self.units:
            z = unit(z, cond)                                               # (B, W)
        return self.head(self.out_norm(z))                                  # (B, d)
