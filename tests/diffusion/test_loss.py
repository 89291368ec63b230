"""The training loss: denoising MSE reproduced by hand, label dropout, the sensitivity penalty's
composition over units, and diagnostics."""
import pytest
import torch

from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss
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
    out = diffusion_loss(model, x0, labels, schedule, config, generator=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    torch.rand(4, generator=g)                          # label-dropout draw
    torch.randperm(len(units), generator=g)
    with UnitTracer(model, keep_inputs=True) as tracer:
        model(schedule.add_noise(x0, t, eps), t, labels)
    expected = sum(rec.unit.sensitivity(rec.z, rec.cond, torch.randn(rec.z.shape, generator=g)).mean()
                   for rec in tracer.records)
    torch.testing.assert_close(out.penalty, expected.detach())
    torch.testing.assert_close(out.loss, out.mse + 0.5 * out.penalty)
    assert out.penalty > 0


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


def test_penalty_gradient_reaches_gates_and_branches():
    model, (x0, labels) = tiny_model(), batch()
    units = gated_units(model)
    config = LossConfig(gamma=1.0, penalty_units=len(units))
    out = diffusion_loss(model, x0, labels, VPSchedule(), config, generator=torch.Generator().manual_seed(1))
    (out.loss - out.mse).backward()       # the penalty alone
    for unit in units:
        assert unit.gates.head.weight.grad.abs().sum() > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unit.body.parameters())


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
