"""The reverse step's variance and the variational bound: closed forms, the ends of the learned
range, the bound's zero at the true posterior, and the hybrid loss's stop-gradient."""
import math

import pytest
import torch
from scipy.stats import norm

from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss, sample
from nrdm.diffusion.loss import NoiseDraws
from nrdm.diffusion.variance import (discretized_gaussian_nll, learned_log_variance, log_variance_range, normal_kl,
                                     posterior_mean, vlb_term)
from nrdm.models import build_model


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_nll_is_the_bin_mass_and_the_bins_sum_to_one():
    mean, log_scale = torch.tensor(0.3, dtype=torch.float64), torch.tensor(math.log(0.2), dtype=torch.float64)
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    mass = (-discretized_gaussian_nll(levels, mean, log_scale)).exp()
    assert float(mass.sum()) == pytest.approx(1.0, abs=1e-9)            # the outer bins reach to -inf / +inf
    x, w = float(levels[100]), 1 / 255
    expected = norm.cdf(x + w, 0.3, 0.2) - norm.cdf(x - w, 0.3, 0.2)
    assert float(mass[100]) == pytest.approx(expected, rel=1e-9)
    assert float(mass[0]) == pytest.approx(norm.cdf(-1 + w, 0.3, 0.2), rel=1e-9)


def test_posterior_mean_and_variance_are_ddpms_at_consecutive_steps():
    """At s = t - 1 the posterior is Ho et al.'s eq. 7: mu = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
    + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t, beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t."""
    s = VPSchedule("cosine")
    abar, betas, t = s.alphas_cumprod, s.betas, 400
    x0, xt = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64)
    mu = abar[t - 1].sqrt() * betas[t] / (1 - abar[t]) * x0 + (1 - betas[t]).sqrt() * (1 - abar[t - 1]) / (1 - abar[t]) * xt
    torch.testing.assert_close(posterior_mean(x0, xt, abar[t], abar[t - 1]), mu)
    small, large = log_variance_range(abar[t], abar[t - 1])
    torch.testing.assert_close(small.exp(), (1 - abar[t - 1]) / (1 - abar[t]) * betas[t])
    torch.testing.assert_close(large.exp(), betas[t])
    assert float(learned_log_variance(torch.tensor(-1.0), small, large)) == pytest.approx(float(small))
    assert float(learned_log_variance(torch.tensor(1.0), small, large)) == pytest.approx(float(large))
    half = learned_log_variance(torch.tensor(0.0), small, large)        # geometric mean of the two ends
    assert float(half) == pytest.approx(0.5 * float(small + large))


def test_vlb_term_vanishes_at_the_true_posterior_and_grows_away_from_it():
    s = VPSchedule("linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([1, 3, 10, 30])          # beta and beta~ differ at small t (at t = 1 by 2x)
    xt = s.add_noise(x0, t, torch.randn(x0.shape, generator=g))
    exact = vlb_term(x0, xt, x0, -torch.ones_like(x0), t, s.alphas_cumprod)       # v = -1: variance beta~
    assert exact.abs().max() < 1e-5
    off_variance = vlb_term(x0, xt, x0, torch.zeros_like(x0), t, s.alphas_cumprod)
    off_mean = vlb_term(x0, xt, x0 + 0.1, -torch.ones_like(x0), t, s.alphas_cumprod)
    assert (off_variance > 1e-5).all() and (off_mean > 1e-4).all()


def test_vlb_term_at_step_zero_is_the_decoder_nll_in_bits():
    s = VPSchedule("linear")
    x0 = torch.linspace(-1, 1, 256).view(1, 1, 16, 16)
    xt, v = x0 * 0.99, torch.full_like(x0, 0.3)
    t = torch.tensor([0])
    abar = s.alphas_cumprod
    beta_tilde_1 = (1 - abar[0]) / (1 - abar[1]) * (1 - abar[1] / abar[0])   # the clipped lower end at t = 0
    log_var = learned_log_variance(v.double(), beta_tilde_1.log(), (1 - abar[0]).log())
    mean = posterior_mean(x0.double(), xt.double(), abar[0], torch.tensor(1.0, dtype=torch.float64))
    expected = discretized_gaussian_nll(x0.double(), mean, 0.5 * log_var).mean() / math.log(2)
    assert float(vlb_term(x0, xt, x0, v, t, abar)) == pytest.approx(float(expected), rel=1e-4)


def tiny_sigma_model(learn_sigma=True):
    torch.manual_seed(0)
    return build_model(backbone="flow", in_channels=1, image_size=8, width=16, depth=2, heads=2, patch_size=2,
                       num_classes=3, variant="adaln-zero", learn_sigma=learn_sigma)


def test_hybrid_loss_trains_only_the_variance_through_the_bound():
    """vlb_weight = 0 is the plain loss exactly (and the hybrid loss logs that plain MSE as its mse);
    the bound's gradient reaches the variance channels
    and not the prediction channels (the mean is detached), so the prediction channels' gradient
    is the same with and without the bound."""
    model, s = tiny_sigma_model(), VPSchedule("linear")
    x0, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    draws = NoiseDraws.sample(x0.shape, 1000, 0.1, torch.Generator().manual_seed(1))
    outputs = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append(out)

    handle = model.register_forward_hook(keep)
    plain = diffusion_loss(model, x0, y, s, LossConfig(), draws=draws).loss
    plain.backward()
    hybrid_out = diffusion_loss(model, x0, y, s, LossConfig(vlb_weight=1.0), draws=draws)
    hybrid = hybrid_out.loss
    hybrid.backward()
    handle.remove()
    mse_only = ((outputs[0][:, :1] - draws.noise) ** 2).mean()
    assert torch.equal(plain, mse_only)
    assert hybrid > plain
    assert torch.equal(hybrid_out.mse, plain.detach())     # the logged MSE leaves the bound out
    torch.testing.assert_close(outputs[1].grad[:, :1], outputs[0].grad[:, :1])
    assert torch.equal(outputs[0].grad[:, 1:], torch.zeros_like(outputs[0].grad[:, 1:]))
    assert outputs[1].grad[:, 1:].abs().sum() > 0


def test_hybrid_loss_needs_a_variance_output():
    model = tiny_sigma_model(learn_sigma=False)
    with pytest.raises(ValueError, match="model.learn_sigma: true"):
        diffusion_loss(model, torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), VPSchedule(), LossConfig(vlb_weight=1.0))


def gaussian_eps_fn(schedule, variance_value=None):
    """eps of 1-d Gaussian data N(0.5, 0.2^2) in closed form, optionally with constant variance values."""
    abar = schedule.alphas_cumprod

    def eps_fn(x, t):
        a = abar[t].to(x.dtype).view(-1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * 0.5) / (a * 0.04 + 1 - a)
        return eps if variance_value is None else (eps, torch.full_like(x, variance_value))

    return eps_fn


@pytest.mark.parametrize("value,fixed", [(-1.0, "fixed-small"), (1.0, "fixed-large")])
def test_learned_variance_at_the_ends_of_its_range_is_the_fixed_one(value, fixed):
    s = VPSchedule("linear")
    x = torch.randn(200, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    learned = sample(gaussian_eps_fn(s, value), x, s, "ddpm", 20, variance="learned",
                     generator=torch.Generator().manual_seed(1))
    reference = sample(gaussian_eps_fn(s), x, s, "ddpm", 20, variance=fixed, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(learned, reference)
    other = "fixed-large" if fixed == "fixed-small" else "fixed-small"
    assert not torch.allclose(learned, sample(gaussian_eps_fn(s), x, s, "ddpm", 20, variance=other,
                                              generator=torch.Generator().manual_seed(1)))


def test_fixed_large_ddpm_samples_gaussian_data():
    s = VPSchedule("linear")
    x = sample(gaussian_eps_fn(s), torch.randn(10000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
               s, "ddpm", 1000, variance="fixed-large", generator=torch.Generator().manual_seed(1))
    assert float(x.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(x.std()) == pytest.approx(0.2, abs=0.01)


def test_learned_variance_errors_are_clear():
    s = VPSchedule("linear")
    with pytest.raises(ValueError, match="eps_predictor\\(..., with_variance=True\\)"):
        sample(gaussian_eps_fn(s), torch.zeros(2, 1), s, "ddpm", 5, variance="learned")
    with pytest.raises(ValueError, match="unknown DDPM variance 'auto'"):
        sample(gaussian_eps_fn(s), torch.zeros(2, 1), s, "ddpm", 5, variance="auto")


def test_a_learned_sigma_run_trains_with_the_hybrid_loss_and_samples_with_its_variance(tmp_path, tiny_overrides):
    import json

    from nrdm.cli import main as cli_main
    from nrdm.config import load_config
    from nrdm.training import train

    flow = ["model.size=null", "model.backbone=flow",
            "model.width=16", "model.depth=1", "model.heads=2", "model.patch_size=2", "model.learn_sigma=true",
            "model.variant=adaln-zero", "diffusion.vlb_weight=1.0", "train.steps=4"]
    from nrdm.factory import build_loss_config
    cfg = load_config("digits", tiny_overrides + flow)
    assert build_loss_config(cfg).vlb_weight == 1.0                  # the config key reaches the loss
    train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(math.isfinite(v) for v in losses)
    assert cli_main(["sample", str(tmp_path / "run"), "--n", "4", "--steps", "3", "--sampler", "ddpm",
                     "--out", str(tmp_path / "g.png")]) == 0
