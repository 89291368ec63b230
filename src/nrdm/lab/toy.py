"""Toy lab with exact ground truth: low-dimensional distributions we can sample without limit,
denoised by a deep stack of the same gated units the image backbones use (MLP branches).

The quality metric is the energy distance between generated samples and fresh true samples; its
floor is the energy distance between two independent true sample sets of the same size.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss, eps_predictor, sample
from nrdm.lab.grid import DIVERGENCE_FACTOR
from nrdm.models.blocks import wants_input_conditioning
from nrdm.models.gated_unit import Conditioning, GatedResidual, UnitConfig, count_units
from nrdm.models.layers import Mlp, TimestepEmbedder
from nrdm.models.tracing import gate_profile
from nrdm.training.divergence import DivergenceMonitor
from nrdm.training.ema import EMA

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
        count_units(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.time(t)                                                    # (B, W)
        cond = Conditioning(c, 2.0 * t.float() / self.num_timesteps - 1.0)
        z = self.stem(x)                                                    # (B, W)
        if self.cond_in is not None:
            z = z + self.cond_in(c)
        for unit in self.units:
            z = unit(z, cond)                                               # (B, W)
        return self.head(self.out_norm(z))                                  # (B, d)


@dataclass(frozen=True)
class ToyCell:
    """One toy run: `depth` gated MLP units of `variant`, trained `steps` steps at batch
    `batch_size` with penalty weight `gamma` (on `penalty_units` random units per step)."""

    dataset: str
    variant: str
    depth: int
    gamma: float
    seed: int
    width: int = 32
    steps: int = 120
    batch_size: int = 128
    lr: float = 1e-3
    penalty_units: int = 1
    ema_decay: float = 0.99              # samples come from the EMA weights, as in the image runs

    @property
    def setting(self) -> str:
        return f"toy-{self.dataset}"

    @property
    def key(self) -> str:
        return f"{self.setting}|{self.variant}|d{self.depth}|g{self.gamma:g}|s{self.seed}|w{self.width}|n{self.steps}"

    def run(self, eval_n: int = 1000, sample_steps: int = 20, snapshots: int = 4, curve_points: int = 5) -> dict:
        """Train; return the grid record (see nrdm.lab.grid): the loss/energy curve, final energy
        distance with the real-vs-real floor at the same n, per-unit sensitivity at `snapshots`
        points of training, gate means against diffusion time, and divergence status."""
        start, cpu_start = time.time(), time.process_time()
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        schedule = VPSchedule("linear")
        model = ToyDenoiser(toy_dim(self.dataset), self.width, self.depth, unit=self.variant)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr)
        ema = EMA(model, self.ema_decay)
        loss_cfg = LossConfig(gamma=self.gamma, penalty_units=min(self.penalty_units, self.depth), label_drop=0.0)
        snap_at = {max(1, round(self.steps * (i + 1) / snapshots)) for i in range(snapshots)} | {1}
        curve_at = {max(1, round(self.steps * (i + 1) / curve_points)) for i in range(curve_points)}
        record = {**asdict(self), "key": self.key, "setting": self.setting, "metric": "energy distance",
                  "diverged": False, "diverged_step": None, "curve": [], "sensitivity": {}}
        monitor, recent = DivergenceMonitor(DIVERGENCE_FACTOR), []
        for step in range(1, self.steps + 1):
            x0 = sample_toy(self.dataset, self.batch_size, gen)
            out = diffusion_loss(model, x0, None, schedule, loss_cfg, generator=gen, diagnostics=step in snap_at)
            loss = float(out.loss.detach())
            if monitor.diverged(step, loss):
                record.update(diverged=True, diverged_step=step, diverged_loss=loss if math.isfinite(loss) else str(loss))
                break
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema.update(model, step)
            recent = (recent + [float(out.mse)])[-50:]
            if out.tracer is not None:
                record["sensitivity"][str(step)] = out.tracer.diagnostics()["adjoint_norm"]
            if step in curve_at:
                record["curve"].append({"step": step, "loss": sum(recent) / len(recent),
                                        "quality": self._energy(ema.model, schedule, eval_n // 2, sample_steps, step)})
        if not record["diverged"]:
            record["final_loss"] = sum(recent) / len(recent)
            record["quality"] = self._energy(ema.model, schedule, eval_n, sample_steps, 0)
            record["gates"] = gate_profile(ema.model, sample_toy(self.dataset, 256, torch.Generator().manual_seed(1)))
        floor_gen = torch.Generator().manual_seed(10_000 + self.seed)
        record["quality_floor"] = energy_distance(sample_toy(self.dataset, eval_n, floor_gen),
                                                  sample_toy(self.dataset, eval_n, floor_gen))
        record["seconds"], record["cpu_seconds"] = time.time() - start, time.process_time() - cpu_start
        return record

    @torch.no_grad()
    def _energy(self, model, schedule, n: int, steps: int, salt: int) -> float:
        x_T = torch.randn(n, toy_dim(self.dataset), generator=torch.Generator().manual_seed(self.seed + 7 + salt))
        samples = sample(eps_predictor(model, schedule), x_T, schedule, "dpm++2m", steps)
        if not torch.isfinite(samples).all():
            return float("inf")
        truth = sample_toy(self.dataset, n, torch.Generator().manual_seed(20_000 + self.seed + salt))
        return energy_distance(samples, truth)
