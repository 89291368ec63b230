"""Training objective (SPEC section 3):

    L = E_n w(n) || F_theta(x_n, n) - target ||^2  +  gamma * sum_i ||alpha_i J_i - beta_i I||_F^2 / D

with n uniform (or logit-normal in log-SNR, `timestep_sampling`) and w = 1 (or Min-SNR-gamma). For a
multi-resolution backbone the first term may be a weighted sum over its branches (`branch_weights`);
for a learned-sigma model it may add the variational bound L_n that trains the variance (`vlb_weight`,
the hybrid loss of improved DDPM).

The first term is denoising score matching in its eps- (or v-) prediction form. The second is
the residual-sensitivity penalty, summed over the gated units i; each term is estimated by
Hutchinson's trick with one random probe (`GatedResidual.sensitivity`) and the sum by an unbiased
random subset of `penalty_units` units per step, scaled by (#units / #subset). gamma = 0 skips
all of it: no tracing, no extra passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nrdm.diffusion.schedule import TIMESTEP_SAMPLINGS, VPSchedule
from nrdm.diffusion.variance import vlb_term
from nrdm.models.blocks import split_output, unwrap
from nrdm.models.conditions import null_condition, replace_where
from nrdm.models.gated_unit import gated_units
from nrdm.models.tracing import UnitTracer

PROBES = ("gaussian", "rademacher")


@dataclass
class LossConfig:
    gamma: float = 0.0          # weight of the residual-sensitivity penalty (0 = off)
    penalty_units: int = 1      # units per step at which the penalty is evaluated
    probe: str = "gaussian"     # Hutchinson probe distribution: gaussian (SPEC) or rademacher
    label_drop: float = 0.1     # probability of training a label as the null class (for guidance)
    min_snr_gamma: float = 0.0  # Min-SNR-gamma weighting of the MSE (0 = off: plain mean)
    timestep_sampling: str = "uniform"   # uniform | logit-normal (VPSchedule.timestep_density)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    branch_weights: tuple[float, ...] | None = None  # multi-resolution loss (multires backbone), coarse to fine
    vlb_weight: float = 0.0     # hybrid loss: + vlb_weight * L_t (bits/dim) for a learned-sigma model

    def __post_init__(self):
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; allowed: {', '.join(PROBES)}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {self.timestep_sampling!r}; allowed: "
                             f"{', '.join(TIMESTEP_SAMPLINGS)}")
        if self.gamma < 0 or self.penalty_units < 1 or not 0 <= self.label_drop <= 1:
            raise ValueError(f"need gamma >= 0, penalty_units >= 1, 0 <= label_drop <= 1; got {self}")
        if self.min_snr_gamma < 0 or self.logit_std <= 0 or self.vlb_weight < 0:
            raise ValueError(f"need min_snr_gamma >= 0, logit_std > 0 and vlb_weight >= 0; got {self}")
        if self.branch_weights is not None:
            self.branch_weights = tuple(float(w) for w in self.branch_weights)
            if not self.branch_weights or min(self.branch_weights) < 0 or not sum(self.branch_weights) > 0:
                raise ValueError(f"branch_weights must be >= 0 with a positive sum, got {list(self.branch_weights)}")

    def timestep_density(self, schedule: VPSchedule) -> torch.Tensor | None:
        """Training distribution of the steps (None: uniform)."""
        return schedule.timestep_density(self.timestep_sampling, self.logit_mean, self.logit_std)


@dataclass
class LossOutput:
    loss: torch.Tensor                    # scalar to backpropagate
    mse: torch.Tensor                     # plain (unweighted) MSE of the prediction (detached): comparable across
                                          # runs whatever Min-SNR weighting, VLB term or penalty `loss` carries
    penalty: torch.Tensor | None = None   # sensitivity term before gamma (detached), None when off
    tracer: UnitTracer | None = None      # with diagnostics=True: call .diagnostics() after backward


def draw_probe(like: torch.Tensor, kind: str, seeds: torch.Tensor) -> torch.Tensor:
    """v with E[v v^T] = I, shaped like `like`; each sample's rows drawn from its own seed, so a
    sample's probe does not depend on how the batch is split over processes or micro-batches.
    `like` may hold k rows per sample (video backbones fold frames or positions into the batch
    axis, each sample's rows contiguous): sample b's seed then draws rows b*k .. b*k + k - 1."""
    if like.shape[0] % len(seeds):
        raise ValueError(f"a unit input with {like.shape[0]} rows does not split into {len(seeds)} samples")
    rows = (like.shape[0] // len(seeds), *like.shape[1:])
    v = torch.cat([torch.randn(rows, generator=torch.Generator(like.device).manual_seed(int(seed)),
                               device=like.device, dtype=like.dtype) for seed in seeds.tolist()])
    return v.sign() if kind == "rademacher" else v


def sensitivity_penalty(records, total_units: int, probe: str, probe_seeds: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of sum_i ||alpha_i J_i - beta_i I||_F^2 / D from traced unit inputs;
    the k-th penalised unit draws its probes from the per-sample seeds offset by k."""
    terms = [rec.unit.sensitivity(rec.z, rec.cond, draw_probe(rec.z, probe, probe_seeds + k * 1_000_003)).mean()
             for k, rec in enumerate(records)]
    return torch.stack(terms).sum() * (total_units / len(terms))


def gather_sharded_parameters(model: nn.Module, units) -> None:
    """Under FSDP2 (`fully_shard`) a sharded block reshards its parameters after its forward, but
    the penalty evaluates the unit again after the model's forward. Unshard (all-gather) the
    innermost sharded module holding each unit and leave it so: FSDP reshards it after its
    backward. Every rank penalises the same units (shared generator), so the collectives match.
    No-op without FSDP. Duck-typed (`unshard`) so this module needs no FSDP import."""
    owners = {}
    for name, module in model.named_modules():
        if hasattr(module, "unshard") and hasattr(module, "reshard"):
            owners[name] = module
    if not owners:
        return
    names = {id(m): name for name, m in model.named_modules()}
    for unit in units:
        name = names[id(unit)]
        prefixes = [p for p in owners if p == "" or name == p or name.startswith(p + ".")]
        owners[max(prefixes, key=len)].unshard()


@dataclass
class NoiseDraws:
    """The random inputs of one loss evaluation: diffusion steps, noise, label-dropout mask and
    the seeds of the penalty's probes. Drawn for a whole global batch and sliced per
    process/micro-batch, so that any split of the batch sees the same randomness as one process
    would."""

    t: torch.Tensor             # (B,) integer steps
    noise: torch.Tensor         # x0-shaped N(0, I)
    drop: torch.Tensor          # (B,) bool: label replaced by the null class
    probe_seeds: torch.Tensor   # (B,) int64 on the CPU: per-sample seeds of the Hutchinson probes

    @classmethod
    def sample(cls, shape, num_timesteps: int, label_drop: float, generator: torch.Generator | None = None,
               device="cpu", density: torch.Tensor | None = None) -> "NoiseDraws":
        """density: probabilities (T,) of the steps (VPSchedule.timestep_density); None = uniform."""
        gen_device = generator.device if generator is not None else device
        if density is None:
            t = torch.randint(0, num_timesteps, (shape[0],), generator=generator, device=gen_device)
        else:
            t = torch.multinomial(density.to(gen_device, torch.float64), shape[0], replacement=True, generator=generator)
        noise = torch.randn(shape, generator=generator, device=gen_device)
        drop = torch.rand(shape[0], generator=generator, device=gen_device) < label_drop
        probe_seeds = torch.randint(0, 2 ** 62, (shape[0],), generator=generator, device=gen_device).cpu()
        return cls(t.to(device), noise.to(device), drop.to(device), probe_seeds)

    def slice(self, start: int, stop: int) -> "NoiseDraws":
        return NoiseDraws(self.t[start:stop], self.noise[start:stop], self.drop[start:stop],
                          self.probe_seeds[start:stop])

    def to(self, device) -> "NoiseDraws":
        return NoiseDraws(self.t.to(device), self.noise.to(device), self.drop.to(device), self.probe_seeds)


def _mse(out: torch.Tensor, target: torch.Tensor, schedule: VPSchedule, t: torch.Tensor,
         min_snr_gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the denoising term, the plain MSE, detached). The term is the plain mean of squared errors,
    or with min_snr_gamma > 0 each sample's mean weighted by Min-SNR-gamma
    (VPSchedule.min_snr_weight); the plain MSE is what the log reports either way."""
    err = (out.float() - target.float()).pow(2)
    plain = err.mean()
    if not min_snr_gamma:
        return plain, plain.detach()
    return (err.flatten(1).mean(1) * schedule.min_snr_weight(t, min_snr_gamma)).mean(), plain.detach()


def branch_target(target: torch.Tensor, size: int) -> torch.Tensor:
    """The target at a coarse branch's resolution: r * avgpool_r(target), r = H / size. The factor r
    keeps a unit-variance eps target at unit variance (the mean of r^2 independent values has
    variance 1/r^2), as DiMR's code does; r = 1 returns the target itself."""
    ratio = target.shape[-1] // size
    if ratio * size != target.shape[-1]:
        raise ValueError(f"a branch of side {size} does not divide the target's side {target.shape[-1]}")
    return target if ratio == 1 else ratio * nn.functional.avg_pool2d(target, ratio)


def denoising_term(model: nn.Module, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, condition,
                   target: torch.Tensor, schedule: VPSchedule, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, plain MSE detached). The objective is E w(n) ||F(x_n, n) - target||^2; with
    branch_weights (multi-resolution loss, DiMR), sum_r w_r E w(n) ||F_r(x_n, n) - target_r||^2 over
    the branches r of a multires backbone; with vlb_weight (the hybrid loss), + vlb_weight E L_n of
    the learned variance, the mean's gradient stopped (nrdm.diffusion.variance.vlb_term). The plain
    MSE is the same sum with w(n) = 1 and without the VLB term."""
    if config.branch_weights is None:
        prediction, variance = split_output(model, model(xt, t, condition))
        term, plain = _mse(prediction, target, schedule, t, config.min_snr_gamma)
        if not config.vlb_weight:
            return term, plain
        if variance is None:
            raise ValueError("diffusion.vlb_weight > 0 trains a learned variance, but the model has none: set "
                             "model.learn_sigma: true (flow backbone) or diffusion.vlb_weight: 0")
        x0_pred = schedule.to_x0(prediction.detach(), xt, t)
        return term + config.vlb_weight * vlb_term(x0, xt, x0_pred, variance, t, schedule.alphas_cumprod).mean(), plain
    if config.vlb_weight:
        raise ValueError("diffusion.vlb_weight (learned variance) and diffusion.branch_weights (multi-resolution "
                         "loss) do not combine: the multires backbone has no variance output")
    predictions = model(xt, t, condition, all_branches=True)
    if len(predictions) != len(config.branch_weights):
        raise ValueError(f"diffusion.branch_weights has {len(config.branch_weights)} entries for a model with "
                         f"{len(predictions)} branches: give one weight per branch, coarse to fine")
    terms = [_mse(p, branch_target(target, p.shape[-1]), schedule, t, config.min_snr_gamma) for p in predictions]
    return (sum(w * term for w, (term, _) in zip(config.branch_weights, terms)),
            sum(w * plain for w, (_, plain) in zip(config.branch_weights, terms)))


def diffusion_loss(model: nn.Module, x0: torch.Tensor, condition, schedule: VPSchedule,
                   config: LossConfig = LossConfig(), generator: torch.Generator | None = None,
                   diagnostics: bool = False, draws: NoiseDraws | None = None) -> LossOutput:
    """One Monte-Carlo estimate of the loss on a batch: t ~ U{0..T-1}, eps ~ N(0, I), condition (class
    indices or TextEmbeddings) dropped to the model's null condition with probability label_drop,
    and the probes' seeds. `draws` supplies those; by default they come from `generator`, which
    also picks the penalized units.

    diagnostics=True traces every unit (update ratios, gate statistics, and, once the loss has
    been backpropagated, adjoint norms): read them with `output.tracer.diagnostics()`.
    """
    if draws is None:
        draws = NoiseDraws.sample(x0.shape, schedule.num_timesteps, config.label_drop, generator, x0.device,
                                  config.timestep_density(schedule))
    t, noise = draws.t, draws.noise.to(x0.dtype)
    if condition is not None:           # condition dropout: the null class or the empty caption
        null = null_condition(unwrap(model), x0.shape[0], x0.device)
        if null is not None:
            condition = replace_where(draws.drop, null, condition)
    xt = schedule.add_noise(x0, t, noise)
    target = schedule.target(x0, t, noise)
    if config.gamma == 0 and not diagnostics:
        objective, mse = denoising_term(model, x0, xt, t, condition, target, schedule, config)
        return LossOutput(objective, mse)

    units = gated_units(model)
    penalized = []
    if config.gamma > 0:
        pick = torch.randperm(len(units), generator=generator)[:config.penalty_units].tolist()
        penalized = [units[i] for i in pick]
    with UnitTracer(model, units=units if diagnostics else penalized, keep_inputs=penalized,
                    stats=diagnostics) as tracer:
        objective, mse = denoising_term(model, x0, xt, t, condition, target, schedule, config)
    if not penalized:
        return LossOutput(objective, mse, tracer=tracer)
    gather_sharded_parameters(model, penalized)
    penalty = sensitivity_penalty(tracer.kept, len(units), config.probe, draws.probe_seeds)
    return LossOutput(objective + config.gamma * penalty, mse, penalty.detach(),
                      tracer if diagnostics else None)
