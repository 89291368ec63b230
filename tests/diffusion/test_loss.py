"""The training loss: denoising MSE reproduced by hand, label dropout, the sensitivity penalty's
composition over units, and diagnostics."""
import pytest
import torch

from nrdm.diffusion import LossConfig, NoiseDraws, VPSchedule, diffusion_loss
from nrdm.diffusion.loss import draw_probe
from nrdm.models import build_model, gated_units
from nrdm.models.tracing import UnitTracer


def tiny_model(variant="nrdm", randomize=True):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", image_size=8, in_channels=1, num_classes=3, depth=2, variant=variant)
    if randomize:   # leave the identity init so gates and penalty are non-zero
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_mse_matches_manual_computation(prediction):
    model, (x0, labels) = tiny_model(), batch()
    schedule = VPSchedule("cosine", prediction=prediction)
    out = diffusion_loss(model, x0, labels, schedule, LossConfig(label_drop=0.0),
                         generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = schedule.alphas_cumprod[t].float()[:, None, None, None]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
    expected = (model(xt, t, labels) - target).pow(2).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.penalty is None and out.tracer is None


def test_label_dropout_sends_null_class():
    model, (x0, labels) = tiny_model(), batch()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))
    diffusion_loss(model, x0, labels, VPSchedule(), LossConfig(label_drop=1.0))
    diffusion_loss(model, x0, labels, VPSchedule(), LossConfig(label_drop=0.0))
    assert seen[0].eq(model.null_class).all()
    assert torch.equal(seen[1], labels)


def test_penalty_is_sum_of_unit_sensitivities():
    """With every unit selected, the penalty equals sum_i mean_b R_i(b) with the same probes."""
    model, (x0, labels) = tiny_model(), batch()
    schedule = VPSchedule()
    units = gated_units(model)
    config = LossConfig(gamma=0.5, penalty_units=len(units), label_drop=0.0)
    draws = NoiseDraws.sample(x0.shape, 1000, 0.0, torch.Generator().manual_seed(5))
    out = diffusion_loss(model, x0, labels, schedule, config, generator=torch.Generator().manual_seed(5), draws=draws)

    with UnitTracer(model, keep_inputs=True) as tracer:
        model(schedule.add_noise(x0, draws.t, draws.noise), draws.t, labels)
    expected = 0.0
    for k, rec in enumerate(tracer.records):              # probes in call order, k-th unit offset by k
        probe = draw_probe(rec.z, "gaussian", draws.probe_seeds + k * 1_000_003)
        expected = expected + rec.unit.sensitivity(rec.z, rec.cond, probe).mean()
    torch.testing.assert_close(out.penalty, expected.detach())
    torch.testing.assert_close(out.loss, out.mse + 0.5 * out.penalty)
    assert out.penalty > 0


def test_probes_do_not_depend_on_the_batch_split():
    """A sample's probe comes from its own seed: the first half of a batch's probes equals the
    probes drawn for that half alone (what each of 2 processes draws)."""
    like = torch.zeros(6, 3, 4)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16])
    whole = draw_probe(like, "gaussian", seeds)
    torch.testing.assert_close(whole[3:], draw_probe(like[3:], "gaussian", seeds[3:]), rtol=0, atol=0)
    assert not torch.equal(whole[0], whole[1])
    assert draw_probe(like, "rademacher", seeds).abs().eq(1).all()


def test_penalty_subset_is_scaled_to_the_sum():
    """A random subset of k units, scaled by N/k, estimates the full sum: average over draws."""
    model, (x0, labels) = tiny_model(), batch()
    schedule = VPSchedule()
    n = len(gated_units(model))

    def mean_penalty(k, draws):
        cfg = LossConfig(gamma=1.0, penalty_units=k, label_drop=0.0, probe="rademacher")
        vals = [diffusion_loss(model, x0, labels, schedule, cfg, generator=torch.Generator().manual_seed(s)).penalty
                for s in range(draws)]
        return torch.stack(vals).mean()

    full, subset = mean_penalty(n, 40), mean_penalty(1, 160)
    assert float(subset) == pytest.approx(float(full), rel=0.25)


def penalty_only_gradients(model, x0, labels, penalty_units=None):
    """Gradients of the penalty term alone: the gamma = 1 loss minus the gamma = 0 loss on the
    same draws (the MSE terms cancel exactly: same forward, same draws)."""
    units = gated_units(model)
    draws = NoiseDraws.sample(x0.shape, 1000, 0.1, torch.Generator().manual_seed(1))
    losses = [diffusion_loss(model, x0, labels, VPSchedule(), LossConfig(gamma=g, penalty_units=penalty_units or len(units)),
                             generator=torch.Generator().manual_seed(2), draws=draws).loss for g in (1.0, 0.0)]
    model.zero_grad(set_to_none=True)
    (losses[0] - losses[1]).backward()
    return units


def grad_sum(params):
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


@pytest.mark.parametrize("backbone", ["flow", "u-transformer", "unet", "video", "unet-video"])
def test_penalty_gradient_reaches_each_units_gates_and_branch_only(backbone):
    """The penalty's own gradient reaches every penalised unit's gate generator and branch,
    and nothing else: not the conditioning embedder (time MLP, class table), not the patch /
    stem layers before the units (unit inputs z and c are constants of the penalty)."""
    torch.manual_seed(0)
    model = build_backbone(backbone)
    with torch.no_grad():                    # leave the identity init so the penalty has gradients
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x0 = torch.randn(3, *model.sample_shape)
    units = penalty_only_gradients(model, x0, torch.tensor([0, 1, 2]))
    for unit in units:
        assert grad_sum(unit.gates.parameters()) > 0
        assert grad_sum(unit.body.parameters()) > 0
    in_units = {id(p) for unit in units for p in unit.parameters()}
    outside = [(n, p) for n, p in model.named_parameters() if id(p) not in in_units]
    assert any(n.startswith("embed.") for n, _ in outside)
    assert grad_sum(p for _, p in outside) == 0, [n for n, p in outside if p.grad is not None and p.grad.abs().sum() > 0]


def build_backbone(backbone):
    kwargs = dict(image_size=8, in_channels=1, num_classes=3, variant="nrdm")
    if backbone == "unet":
        return build_model("UNet-T", **kwargs)
    if backbone == "video":
        return build_model("Latte-T/2", num_frames=2, depth=2, **kwargs)
    if backbone == "unet-video":
        return build_model("UNet-T", num_frames=2, **kwargs)
    size = {"flow": "DiT-T/2", "u-transformer": "U-ViT-T/2"}[backbone]
    return build_model(size, depth=3 if backbone == "u-transformer" else 2, **kwargs)


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backbone", ["flow", "u-transformer", "unet", "video", "unet-video"])
def test_penalty_under_autocast_matches_fp32(backbone, precision):
    """Mixed-precision training: the loss with the penalty runs under autocast for every
    backbone (forward-mode AD through conv under autocast used to fail), and the penalty, which
    is evaluated in fp32, agrees with the fp32 one up to the half-precision forward."""
    torch.manual_seed(0)
    model = build_backbone(backbone)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x0, labels = torch.randn(2, *model.sample_shape), torch.tensor([0, 1])
    config = LossConfig(gamma=1.0, penalty_units=len(gated_units(model)))
    draws = NoiseDraws.sample(x0.shape, 1000, 0.0, torch.Generator().manual_seed(1))

    def run(autocast):
        with torch.autocast("cpu", dtype=precision, enabled=autocast):
            out = diffusion_loss(model, x0, labels, VPSchedule(), config, generator=torch.Generator().manual_seed(2),
                                 draws=draws)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (full, full_grads), (mixed, mixed_grads) = run(False), run(True)
    assert mixed.penalty.dtype == torch.float32 and torch.isfinite(mixed.loss)
    assert float(mixed.penalty) == pytest.approx(float(full.penalty), rel=0.05)
    assert mixed_grads.keys() == full_grads.keys()
    assert all(torch.isfinite(g).all() for g in mixed_grads.values())


def test_diagnostics_cover_every_unit_after_backward():
    model, (x0, labels) = tiny_model(), batch()
    out = diffusion_loss(model, x0, labels, VPSchedule(), LossConfig(gamma=0.1), diagnostics=True)
    out.loss.backward()
    diag = out.tracer.diagnostics()
    n = len(gated_units(model))
    assert len(diag["unit_variant"]) == n
    for key in ["adjoint_norm", "update_ratio", "alpha_mean", "alpha_std", "beta_mean", "beta_std"]:
        assert len(diag[key]) == n and all(isinstance(v, float) and v == v for v in diag[key]), key
    assert all(unit.tracer is None for unit in gated_units(model))


def test_bad_loss_config():
    with pytest.raises(ValueError, match="allowed: gaussian, rademacher"):
        LossConfig(probe="sphere")
    with pytest.raises(ValueError, match="gamma >= 0"):
        LossConfig(gamma=-1.0)


# ------------------------------------------------------------------------------------------
# loss weighting and timestep density
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weight_closed_form(prediction):
    """w = min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, SNR = abar / (1 - abar)."""
    schedule = VPSchedule("linear", prediction=prediction)
    t = torch.tensor([0, 100, 300, 999])
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr if prediction == "eps" else snr + 1)
    torch.testing.assert_close(schedule.min_snr_weight(t, 5.0), expected.float())
    # low noise (SNR >> 5) is down-weighted, high noise (SNR << 5) keeps weight 1 for eps
    w = schedule.min_snr_weight(t, 5.0)
    assert w[0] < 0.01 and (prediction == "v" or w[-1] == 1.0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_loss_is_the_weighted_mse(prediction):
    """Weighting on: the per-sample MSE times the weight, averaged. Off (0): today's plain mean,
    bit for bit. The logged mse stays the plain mean either way, so runs compare."""
    model, (x0, labels) = tiny_model(), batch()
    schedule = VPSchedule("linear", prediction=prediction)
    draws = NoiseDraws.sample(x0.shape, 1000, 0.0, torch.Generator().manual_seed(3))
    xt = schedule.add_noise(x0, draws.t, draws.noise)
    err = (model(xt, draws.t, labels) - schedule.target(x0, draws.t, draws.noise)).pow(2)
    plain = diffusion_loss(model, x0, labels, schedule, LossConfig(label_drop=0.0), draws=draws).loss
    assert torch.equal(plain, err.mean())
    out = diffusion_loss(model, x0, labels, schedule, LossConfig(label_drop=0.0, min_snr_gamma=5.0), draws=draws)
    weighted = out.loss
    torch.testing.assert_close(weighted, (err.flatten(1).mean(1) * schedule.min_snr_weight(draws.t, 5.0)).mean())
    assert not torch.allclose(weighted, plain)
    assert torch.equal(out.mse, err.mean()) and not out.mse.requires_grad


def test_logit_normal_steps_follow_their_density():
    """Drawn steps: per-bin counts within 5 sigma of the density (20 bins of 50 steps), and
    their log-SNR has mean -2m and std 2s (SD3's logit-normal in noise-level terms)."""
    schedule, m, s = VPSchedule("linear"), 0.5, 0.8
    density = schedule.timestep_density("logit-normal", m, s)
    assert density.shape == (1000,) and float(density.sum()) == pytest.approx(1.0, abs=1e-9)
    n = 200_000
    t = NoiseDraws.sample((n, 1), 1000, 0.0, torch.Generator().manual_seed(0), density=density).t
    observed = torch.bincount(t, minlength=1000).view(20, 50).sum(1).double()
    expected = density.view(20, 50).sum(1) * n
    assert ((observed - expected).abs() <= 5 * expected.sqrt() + 5).all()
    lam = schedule.log_snr[t]
    assert float(lam.mean()) == pytest.approx(-2 * m, abs=0.03)
    assert float(lam.std()) == pytest.approx(2 * s, rel=0.02)
    assert schedule.timestep_density("uniform") is None
    with pytest.raises(ValueError, match="allowed: uniform, logit-normal"):
        LossConfig(timestep_sampling="beta")
