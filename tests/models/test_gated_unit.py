"""The gated residual unit: each variant's formula, identity at init, gate sources, the
sensitivity estimate against the exact Jacobian, and the tracer's diagnostics."""
import math

import pytest
import torch
from torch import nn

from nrdm.models.gated_unit import GATE_SOURCES as GATE_SOURCES_ALL
from nrdm.models.gated_unit import VARIANTS, Conditioning, GatedResidual, UnitConfig
from nrdm.models.layers import Attention, ConvBranch, Mlp, group_norm
from nrdm.models.tracing import UnitTracer

C, D_COND, B, N = 6, 5, 3, 4


def make_unit(variant, body=None, gate_source="cond", gate_init="auto", gate_shape="channel", norm=None,
              channel_axis=-1, channels=C):
    unit = UnitConfig(variant, gate_init=gate_init, gate_source=gate_source, gate_shape=gate_shape)
    make_norm = norm or (lambda affine: nn.Identity())
    return GatedResidual(body or nn.Linear(channels, channels), channels, D_COND, unit, make_norm, channel_axis)


def randomize_gates(unit: GatedResidual, scale=0.5):
    """Give the zero-initialised gate parameters random values so every gate matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unit.gates.parameters():
            p.normal_(0, scale)


def conditioning(batch=B):
    torch.manual_seed(2)
    return Conditioning(torch.randn(batch, D_COND), torch.rand(batch) * 2 - 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_update_matches_its_formula(variant):
    """z' written out by hand from the unit's raw gate head, with n = Identity and f = Linear."""
    unit = make_unit(variant)
    unit.set_model_units(16)                       # depth-mup: L = 16 units -> 1/4; no effect on others
    if unit.gates is not None:
        randomize_gates(unit)
    z = torch.randn(B, N, C)
    cond = conditioning()
    f = unit.body
    if variant == "depth-mup":
        expected = z + f(z) / 4
    elif unit.gates is None:
        expected = z + f(z)
    elif variant == "rezero":
        a = unit.gates.value[0, 0]                 # scalar, start value 0
        expected = z + a * f(z)
    else:
        raw = unit.gates.head(nn.functional.silu(cond.vec)).view(B, -1, C)[:, :, None, :]  # (B, n, 1, C)
        if variant == "nrdm":
            alpha, beta = raw[:, 0], raw[:, 1]
            expected = z + alpha * f(z) + beta
        elif variant == "adaln":
            alpha, beta = 1 + raw[:, 0], raw[:, 1]
            expected = z + f(alpha * z + beta)
        elif variant == "scaled-skip":
            alpha, beta = 1 + raw[:, 0], raw[:, 1]
            expected = alpha * z + f(z) + beta
        elif variant == "adaln-zero":
            g, s, b = raw[:, 0], raw[:, 1], raw[:, 2]
            expected = z + g * f(z * (1 + s) + b)
    # bit for bit: the unit runs exactly these operations (so no option left off, such as gate
    # sharing or fusing, changes what a default model computes)
    assert torch.equal(unit(z, cond), expected)


def test_tdp_gates_follow_dimr_formula():
    unit = make_unit("nrdm", gate_source="tdp")
    randomize_gates(unit)
    cond = conditioning()
    gen = unit.gates
    s = torch.sigmoid((1 + gen.tdp_w[0]) * cond.tau[:, None] + gen.tdp_b[0])      # (B, 1) for alpha
    alpha = s * gen.tdp_p0[0] + (1 - s) * gen.tdp_p1[0]                           # (B, C)
    s_b = torch.sigmoid((1 + gen.tdp_w[1]) * cond.tau[:, None] + gen.tdp_b[1])
    beta = s_b * gen.tdp_p0[1] + (1 - s_b) * gen.tdp_p1[1]
    z = torch.randn(B, N, C)
    torch.testing.assert_close(unit(z, cond), z + alpha[:, None] * unit.body(z) + beta[:, None])
    # time-only: two samples with the same tau but different c get the same gates
    cond2 = Conditioning(torch.randn(B, D_COND), cond.tau)
    torch.testing.assert_close(unit(z, cond2), unit(z, cond))


def test_scalar_gates_and_gate_init_one():
    unit = make_unit("nrdm", gate_shape="scalar", gate_init="one")
    assert unit.gates.head.out_features == 2                     # one alpha, one beta
    z = torch.randn(B, N, C)
    torch.testing.assert_close(unit(z, conditioning()), z + unit.body(z))   # alpha = 1, beta = 0 at init


@pytest.mark.parametrize("variant", ["nrdm", "rezero", "adaln-zero"])
@pytest.mark.parametrize("source", ["cond", "tdp", "static"])
def test_identity_at_init(variant, source):
    unit = make_unit(variant, body=Mlp(C), gate_source=source, norm=lambda affine: nn.LayerNorm(C, elementwise_affine=affine))
    z = torch.randn(B, N, C)
    assert torch.equal(unit(z, conditioning()), z)


def test_not_identity_where_not_promised():
    for variant in ["adaln", "scaled-skip", "resnet", "depth-mup"]:
        unit = make_unit(variant)
        z = torch.randn(B, N, C)
        assert not torch.allclose(unit(z, conditioning()), z)


def test_bad_config_names_allowed_values():
    with pytest.raises(ValueError, match="allowed: nrdm, adaln, scaled-skip, resnet, rezero, adaln-zero, depth-mup"):
        UnitConfig("highway")
    with pytest.raises(ValueError, match="allowed: cond, tdp, static"):
        UnitConfig("nrdm", gate_source="mlp")
    with pytest.raises(ValueError, match="allowed: auto, zero, one"):
        UnitConfig("nrdm", gate_init="half")
    assert UnitConfig(3).variant == "resnet"                     # the paper's numbering


def test_conditioning_routes():
    assert UnitConfig("nrdm").gates_see_condition
    assert UnitConfig("adaln-zero").gates_see_condition
    assert not UnitConfig("resnet").gates_see_condition
    assert not UnitConfig("rezero").gates_see_condition
    assert not UnitConfig("depth-mup").gates_see_condition
    assert not UnitConfig("nrdm", gate_source="tdp").gates_see_condition


# ------------------------------------------------------------------------------------------
# sensitivity ||alpha J - beta I||_F^2 / D
# ------------------------------------------------------------------------------------------

def exact_sensitivity(unit, z1, cond1):
    """||diag(alpha) J - diag(beta)||_F^2 / D for a single sample, J from autograd.functional."""
    g = unit.gate_values(cond1, z1.ndim)
    J = torch.autograd.functional.jacobian(lambda zz: unit.branch(zz, g), z1)      # z1.shape * 2
    D = z1.numel()
    J = J.reshape(D, D)
    alpha = (g["gate"].expand_as(z1) if "gate" in g else torch.ones_like(z1)).reshape(D) * unit.branch_scale
    beta = (g["out_shift"].expand_as(z1) if "out_shift" in g else torch.zeros_like(z1)).reshape(D)
    A = (alpha[:, None] * J - torch.diag(beta)).detach()
    return A, (A ** 2).sum() / D


SENSITIVITY_CASES = {
    "mlp-tokens": dict(body=lambda: Mlp(C, 2.0), shape=(1, N, C), axis=-1,
                       norm=lambda affine: nn.LayerNorm(C, elementwise_affine=affine)),
    "attention-tokens": dict(body=lambda: Attention(C, 2), shape=(1, N, C), axis=-1,
                             norm=lambda affine: nn.LayerNorm(C, elementwise_affine=affine)),
    "conv-maps": dict(body=lambda: ConvBranch(C), shape=(1, C, 3, 3), axis=1,
                      norm=lambda affine: group_norm(C, affine)),
}


@pytest.mark.parametrize("variant", ["nrdm", "adaln-zero", "resnet", "depth-mup"])
@pytest.mark.parametrize("case", list(SENSITIVITY_CASES))
def test_sensitivity_estimate_matches_exact(variant, case):
    """Hutchinson: E_v ||alpha J v - beta v||^2 = ||A||_F^2 with Var = 2 ||A^T A||_F^2 (Gaussian v).
    The mean of M probes must lie within 5 standard errors of the exact value."""
    spec = SENSITIVITY_CASES[case]
    torch.manual_seed(0)
    unit = make_unit(variant, body=spec["body"](), norm=spec["norm"], channel_axis=spec["axis"]).double()
    unit.set_model_units(9)                        # depth-mup: alpha = 1/3
    if unit.gates is not None:
        randomize_gates(unit)
    z1 = torch.randn(spec["shape"], dtype=torch.float64)
    cond1 = Conditioning(torch.randn(1, D_COND, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    A, exact = exact_sensitivity(unit, z1, cond1)
    D = z1.numel()

    M = 4000
    zM = z1.expand(M, *z1.shape[1:])
    condM = Conditioning(cond1.vec.expand(M, -1), cond1.tau.expand(M))
    probes = torch.randn(zM.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    estimate = unit.sensitivity(zM, condM, probes).mean().detach()
    std_error = math.sqrt(2 * float(((A.T @ A) ** 2).sum()) / M) / D
    assert abs(float(estimate) - float(exact)) < 5 * std_error, (float(estimate), float(exact), std_error)


@pytest.mark.parametrize("backbone", ["DiT-T/2", "U-ViT-T/2", "UNet-T", "Latte-T/2"])
def test_depth_mup_scale_is_one_over_root_of_the_units_of_the_model(backbone):
    """depth-muP's L is the number of gated units of the whole model, whatever the backbone and
    depth; other variants keep their branch unscaled."""
    from nrdm.models import build_model, gated_units
    kwargs = dict(image_size=8, in_channels=1, num_classes=3, num_frames=2) if backbone.startswith("Latte") else dict(
        image_size=8, in_channels=1, num_classes=3)
    for depth in (4, 6) if not backbone.startswith("UNet") else (1, 2):
        units = gated_units(build_model(backbone, variant="depth-mup", depth=depth, **kwargs))
        assert all(u.branch_scale == pytest.approx(len(units) ** -0.5) for u in units)
    assert all(u.branch_scale == 1.0 for u in gated_units(build_model(backbone, variant="resnet", **kwargs)))


def test_sensitivity_gradient_reaches_gates_and_branch():
    unit = make_unit("nrdm", body=Mlp(C, 2.0), norm=lambda affine: nn.LayerNorm(C, elementwise_affine=affine))
    randomize_gates(unit)
    z = torch.randn(B, N, C)
    unit.sensitivity(z, conditioning(), torch.randn_like(z)).mean().backward()
    assert unit.gates.head.weight.grad.abs().sum() > 0
    assert unit.body.fc1.weight.grad.abs().sum() > 0
    assert unit.body.fc2.weight.grad.abs().sum() > 0


def test_sensitivity_of_zero_gated_unit_is_zero():
    """nrdm at init has alpha = beta = 0, so alpha J - beta I = 0 exactly."""
    unit = make_unit("nrdm", body=Mlp(C))
    z = torch.randn(B, N, C)
    assert torch.equal(unit.sensitivity(z, conditioning(), torch.randn_like(z)), torch.zeros(B))


# ------------------------------------------------------------------------------------------
# diagnostics
# ------------------------------------------------------------------------------------------

def test_tracer_diagnostics_match_autograd():
    torch.manual_seed(0)
    units = nn.ModuleList([make_unit("nrdm", body=Mlp(C)) for _ in range(2)])
    for u in units:
        randomize_gates(u)
    z0 = torch.randn(B, N, C, requires_grad=True)
    cond = conditioning()
    with UnitTracer(units, stats=True) as tracer:
        z1 = units[0](z0, cond)
        z2 = units[1](z1, cond)
        loss = z2.pow(2).sum()
        grad_z0, grad_z1 = torch.autograd.grad(loss, [z0, z1], retain_graph=True)
        loss.backward()
    diag = tracer.diagnostics()
    assert diag["unit_variant"] == ["nrdm", "nrdm"]
    assert diag["adjoint_norm"] == pytest.approx([float(grad_z0.norm()), float(grad_z1.norm())], rel=1e-5)
    with torch.no_grad():
        g = units[0].gate_values(cond, 3)
        ratio = (g["gate"] * units[0].body(units[0].norm(z0))).norm() / z0.norm()
        alpha_mean = units[1].gate_values(cond, 3)["gate"].mean()
    assert diag["update_ratio"][0] == pytest.approx(float(ratio), rel=1e-5)
    assert diag["alpha_mean"][1] == pytest.approx(float(alpha_mean), rel=1e-5)
    assert all(u.tracer is None for u in units)                 # detached on exit


BACKBONE_KWARGS = {"DiT-T/2": dict(image_size=8, in_channels=1, num_classes=3),
                   "U-ViT-T/2": dict(image_size=8, in_channels=1, num_classes=3),
                   "UNet-T": dict(image_size=8, in_channels=1, num_classes=3),
                   "Latte-T/2": dict(image_size=8, in_channels=1, num_classes=3, num_frames=2),
                   "DiMR-T/2R": dict(image_size=8, in_channels=1, num_classes=3)}


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.sample_shape, generator=g)
    return x, torch.tensor([10, 700]), torch.tensor([0, 2])


@pytest.mark.parametrize("backbone", list(BACKBONE_KWARGS))
@pytest.mark.parametrize("variant", ["nrdm", "adaln-zero", "adaln", "scaled-skip"])
def test_shared_gates_are_adaln_single(backbone, variant):
    """gate_source "shared" (adaLN-single): one zero-initialised head per gate shape on the model's
    conditioning embedder and a per-unit embedding. The model starts where the per-unit "cond"
    model starts (the same weights elsewhere, raw gates 0), has exactly the per-unit heads'
    parameters fewer (+ the shared heads and the embeddings), and each unit's gates are the shared
    head's output plus its own embedding."""
    from nrdm.models import build_model, count_parameters, gated_units
    kwargs = BACKBONE_KWARGS[backbone]
    torch.manual_seed(0)
    per_unit = build_model(backbone, variant=variant, gate_source="cond", **kwargs).eval()
    torch.manual_seed(0)
    shared = build_model(backbone, variant=variant, gate_source="shared", **kwargs).eval()
    for model in (per_unit, shared):          # the same random weights off the zero inits, gate parameters kept at 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".gates." not in name and "shared_gates" not in name:
                    g = torch.Generator().manual_seed(sum(map(ord, name)))
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    x, t, y = _inputs(per_unit)
    with torch.no_grad():
        start = per_unit(x, t, y)
        assert start.abs().mean() > 1e-3
        torch.testing.assert_close(shared(x, t, y), start)
    heads = [u.gates.head for u in gated_units(per_unit)]
    removed = sum(h.weight.numel() + h.bias.numel() for h in heads)
    shapes = shared.embed.shared_gates.shapes
    added = sum((per_unit.embed.time.mlp[-1].out_features + 1) * n * w for n, w in shapes.values()) + \
        sum(u.gates.embedding.numel() for u in gated_units(shared))
    assert count_parameters(shared) == count_parameters(per_unit) - removed + added
    assert count_parameters(shared) < count_parameters(per_unit)
    unit = gated_units(shared)[-1]
    with torch.no_grad():
        for p in list(shared.embed.shared_gates.parameters()) + [unit.gates.embedding]:
            p.normal_(0, 0.3)
        cond = shared.embed(t, y)[0]
        expected = shared.embed.shared_gates(cond.vec)[unit.gates.shape_key] + unit.gates.embedding
        torch.testing.assert_close(unit.gates(cond), expected)
        assert not torch.allclose(shared(x, t, y), per_unit(x, t, y))


def test_shared_gates_learn_and_take_the_penalty():
    """The shared heads and the per-unit embeddings get gradients from the loss and from the
    sensitivity penalty (which evaluates units on a detached Conditioning that keeps the shared values)."""
    from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss
    from nrdm.models import build_model, gated_units
    model = build_model("DiT-T/2", variant="nrdm", gate_source="shared", **BACKBONE_KWARGS["DiT-T/2"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    out = diffusion_loss(model, x0, y, VPSchedule(), LossConfig(gamma=1.0, penalty_units=2),
                         generator=torch.Generator().manual_seed(0))
    assert out.penalty is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in model.embed.shared_gates.heads.values())
    assert all(u.gates.embedding.grad.abs().sum() > 0 for u in gated_units(model))


def _randomized(model, seed=0):
    """Every parameter (gate heads included) off its zero init, deterministically by name."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _grads_by_unit(model):
    """Parameter gradients by name, the fused head's split into its units' per-unit names."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    heads = model.embed.fused_gates if hasattr(model, "embed") else None
    if heads is not None:
        for kind in ("weight", "bias"):
            fused = grads.pop(f"embed.fused_gates.linear.{kind}")
            grads.update({f"{name}.head.{kind}": part for name, part in zip(heads.names, fused.split(heads.sizes))})
    return grads


FUSED_CASES = ([("DiT-T/2", v, s) for v in VARIANTS for s in GATE_SOURCES_ALL] +
               [(b, v, "cond") for b in BACKBONE_KWARGS if b != "DiT-T/2" for v in ("nrdm", "adaln-zero")])


@pytest.mark.parametrize("backbone,variant,gate_source", FUSED_CASES)
def test_fused_gates_compute_what_the_per_unit_heads_compute(backbone, variant, gate_source):
    """fused_gates: the same weights (loaded from the per-unit model's state dict) give the same
    output and the same gradient on every parameter (the fused head's rows = the units' heads),
    the state dict is the per-unit one, key for key, and the parameter count is unchanged; where
    no unit has a "cond" head there is nothing to fuse."""
    from nrdm.models import build_model, count_parameters, gated_units
    kwargs = dict(BACKBONE_KWARGS[backbone], variant=variant, gate_source=gate_source)
    per_unit = _randomized(build_model(backbone, **kwargs))
    fused = build_model(backbone, fused_gates=True, **kwargs)
    fused.load_state_dict(per_unit.state_dict())                      # strict: every key lands
    heads = [u.gates for u in gated_units(per_unit) if u.gates is not None and u.gates.source == "cond"]
    assert (fused.embed.fused_gates is not None) == bool(heads)
    assert count_parameters(fused) == count_parameters(per_unit)
    x, t, y = _inputs(per_unit)
    weights = torch.randn(per_unit(x, t, y).shape, generator=torch.Generator().manual_seed(3))
    for model in (per_unit, fused):
        model.zero_grad()
        (model(x, t, y) * weights).sum().backward()
    torch.testing.assert_close(fused(x, t, y), per_unit(x, t, y))
    expected, got = _grads_by_unit(per_unit), _grads_by_unit(fused)
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        if grad is None:                                              # unused (multires' coarse heads)
            assert got[name] is None, name
            continue
        # the conditioning's gradient sums the units' parts in another order: rounding of the largest entry
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)
    state, reference = fused.state_dict(), per_unit.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_fused_gates_take_the_penalty_and_save_and_load_as_per_unit_heads(tmp_path):
    """The sensitivity penalty reaches the fused head's rows as it reaches the per-unit heads (its
    detached Conditioning drops the fused values, so each unit recomputes its own gates from c);
    a fused model's weights save with safetensors and load into either layout, and a state that
    lacks a unit's head loads with that head reported missing and its rows kept."""
    from safetensors.torch import load_file, save_file

    from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss
    from nrdm.models import build_model
    kwargs = dict(BACKBONE_KWARGS["DiT-T/2"], variant="nrdm")
    per_unit = _randomized(build_model("DiT-T/2", **kwargs))
    fused = build_model("DiT-T/2", fused_gates=True, **kwargs)
    fused.load_state_dict(per_unit.state_dict())
    x0, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    for model in (per_unit, fused):
        out = diffusion_loss(model, x0, y, VPSchedule(), LossConfig(gamma=1.0, penalty_units=4),
                             generator=torch.Generator().manual_seed(0))
        model.penalty = out.penalty
        out.loss.backward()
    torch.testing.assert_close(fused.penalty, per_unit.penalty)
    expected, got = _grads_by_unit(per_unit), _grads_by_unit(fused)
    heads = [k for k in expected if ".gates.head." in k]
    assert heads and any(expected[k].abs().sum() > 0 for k in heads)
    for name in heads:
        torch.testing.assert_close(got[name], expected[name], msg=name)

    save_file(fused.state_dict(), str(tmp_path / "fused.safetensors"))
    fresh = build_model("DiT-T/2", **kwargs)
    fresh.load_state_dict(load_file(str(tmp_path / "fused.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), per_unit.state_dict().values()))

    partial = {k: v for k, v in per_unit.state_dict().items() if not k.startswith("blocks.1.mlp.gates.")}
    target = build_model("DiT-T/2", fused_gates=True, **kwargs)
    kept = target.state_dict()["blocks.1.mlp.gates.head.weight"]
    result = target.load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == ["blocks.1.mlp.gates.head.bias", "blocks.1.mlp.gates.head.weight"]
    assert not result.unexpected_keys
    state = target.state_dict()
    assert torch.equal(state["blocks.1.mlp.gates.head.weight"], kept)
    assert torch.equal(state["blocks.0.attn.gates.head.weight"], per_unit.state_dict()["blocks.0.attn.gates.head.weight"])
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*blocks\.1\.mlp\.gates\.head"):
        target.load_state_dict(partial)


@pytest.mark.parametrize("mode", ["bf16-autocast", "grad-checkpointing", "compile"])
def test_fused_gates_under_autocast_checkpointing_and_compile(mode):
    """The fused values travel through bf16 autocast, activation checkpointing (the Conditioning is
    a block argument) and torch.compile as the per-unit heads' do."""
    from nrdm.models import build_model
    kwargs = dict(BACKBONE_KWARGS["DiT-T/2"], variant="adaln-zero")
    per_unit = _randomized(build_model("DiT-T/2", **kwargs))
    fused = build_model("DiT-T/2", fused_gates=True, **kwargs)
    fused.load_state_dict(per_unit.state_dict())
    x, t, y = _inputs(per_unit)
    outputs, grads = [], []
    for model in (per_unit, fused):
        model.grad_checkpointing = mode == "grad-checkpointing"
        run = torch.compile(model, backend="eager", fullgraph=True) if mode == "compile" else model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
            out = run(x, t, y)
        out.float().square().mean().backward()
        outputs.append(out.float())
        grads.append(_grads_by_unit(model))
    tolerance = dict(rtol=2e-2, atol=2e-2) if mode == "bf16-autocast" else {}
    torch.testing.assert_close(outputs[1], outputs[0], **tolerance)
    for name, grad in grads[0].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-2 if tolerance else 1e-4,
                                   atol=(3e-2 if tolerance else 1e-5) * scale, msg=name)
