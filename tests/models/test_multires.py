"""The multi-resolution backbone (DiMR): branch resolutions, the feature cascade (add / concat /
cross-branch skips), the multi-resolution loss, and the published sizes' counts."""
import pytest
import torch

from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss
from nrdm.diffusion.loss import NoiseDraws, branch_target
from nrdm.models import build_model, count_parameters
from nrdm.models.blocks import TransformerBlock
from nrdm.models.layers import explicit_attention
from nrdm.models.multires import MultiResolution


def tiny(**kw):
    torch.manual_seed(0)
    kw = {"image_size": 16, "in_channels": 2, "num_classes": 3, "width": 32, "depth": 3, "heads": 2,
          "branch_widths": (16,), "branch_depths": (3,), "patch_size": 2, "variant": "nrdm", **kw}
    model = build_model(backbone="multires", **kw)
    with torch.no_grad():                                   # leave the zero init: every path acts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(model, batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, *model.sample_shape, generator=g), torch.tensor([5, 700])[:batch],
            torch.tensor([0, 2])[:batch])


@pytest.mark.parametrize("widths,depths", [((16,), (3,)), ((16, 8), (3, 1))])
def test_each_branch_works_at_its_resolution(widths, depths):
    """Branch r of R sees maps of side H / 2^(R-r): the transformer branch tokens (B, E + s^2, C),
    each ConvNeXt branch channels-last maps (B, s, s, C); predictions come out at the same sides."""
    R = 1 + len(widths)
    model = tiny(branch_widths=widths, branch_depths=depths, patch_size=2 ** (R - 1))
    seen = {}
    hooks = [block.register_forward_hook(lambda m, a, out, r=r: seen.setdefault(r, set()).add(tuple(out.shape)))
             for r, branch in enumerate(model.branches) for block in branch.blocks]
    x, t, labels = inputs(model)
    predictions = model(x, t, labels, all_branches=True)
    for h in hooks:
        h.remove()
    sides = [16 // 2 ** (R - 1 - r) for r in range(R)]
    assert seen[0] == {(2, 2 + sides[0] ** 2, 32)}                   # time + class token, then patch tokens
    for r in range(1, R):
        assert seen[r] == {(2, sides[r], sides[r], widths[r - 1])}
    assert [tuple(p.shape) for p in predictions] == [(2, 2, s, s) for s in sides] and model.branch_sizes == sides
    torch.testing.assert_close(model(x, t, labels), predictions[-1])


def test_the_patch_size_follows_the_number_of_branches():
    with pytest.raises(ValueError, match="patch_size must be 4"):
        tiny(branch_widths=(16, 8), branch_depths=(1, 1), patch_size=2)
    with pytest.raises(ValueError, match="one entry per ConvNeXt branch"):
        tiny(branch_widths=(16, 8), branch_depths=(1,), patch_size=4)
    with pytest.raises(ValueError, match="allowed: add, concat"):
        tiny(branch_feed="stack")


@pytest.mark.parametrize("options", [{}, {"branch_feed": "concat"}, {"cross_skips": True}])
def test_the_fine_branch_depends_on_the_coarse_one(options):
    """Through the cascade (added, concatenated, or also per block), the coarse branch's blocks
    reach the fine prediction; perturbing a coarse block changes it, and its gradient is nonzero."""
    model = tiny(**options)
    x, t, labels = inputs(model)
    base = model(x, t, labels)
    coarse_block = model.branches[0].blocks[1]
    handle = coarse_block.register_forward_hook(lambda m, a, out: out + 1.0)
    changed = model(x, t, labels)
    handle.remove()
    assert not torch.allclose(base, changed)
    model(x, t, labels).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in coarse_block.parameters() if p.requires_grad
               and p.dim() > 1)
    fine = model.branches[1]
    if options.get("branch_feed") == "concat":
        assert fine.fuse.weight.grad.abs().sum() > 0
    if options.get("cross_skips"):
        assert all(up.proj.weight.grad.abs().sum() > 0 for up in fine.cross)
        assert fine.cross_source == [1, 2, 3]                        # block j takes coarse map ~ (j+1)/depth


def test_cross_skip_and_concat_parameters():
    """concat adds one Linear(2C, C) per fine branch; cross skips one LayerNorm-Linear-LayerNorm per fine block."""
    plain, concat, cross = (count_parameters(tiny(**o)) for o in ({}, {"branch_feed": "concat"}, {"cross_skips": True}))
    assert concat - plain == 2 * 16 * 16 + 16
    assert cross - plain == 3 * (2 * 32 + 32 * 64 + 64 + 2 * 16)


def test_branch_target_is_the_scaled_average_pool():
    target = torch.arange(16.0).view(1, 1, 4, 4)
    pooled = branch_target(target, 2)
    assert torch.equal(pooled, 2 * torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert branch_target(target, 4) is target
    noise = torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert branch_target(noise, 2).var().item() == pytest.approx(1.0, abs=0.03)   # eps stays unit-variance
    with pytest.raises(ValueError, match="does not divide"):
        branch_target(target, 3)


def _loss(model, weights, draws, x0, labels):
    schedule = VPSchedule("linear")
    return diffusion_loss(model, x0, labels, schedule, LossConfig(branch_weights=weights), draws=draws).loss


def test_multi_resolution_loss_reduces_to_the_plain_loss():
    """Weights (0, 1): exactly today's loss. Weights (1, 0): the coarse head's MSE against the
    pooled target, by hand. Weights (a, b): their weighted sum."""
    model = tiny()
    x0 = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 0])
    draws = NoiseDraws.sample(x0.shape, 1000, 0.0, torch.Generator().manual_seed(4))
    plain = _loss(model, None, draws, x0, labels)
    assert torch.equal(_loss(model, (0.0, 1.0), draws, x0, labels), plain)
    schedule = VPSchedule("linear")
    xt = schedule.add_noise(x0, draws.t, draws.noise)
    coarse = model(xt, draws.t, labels, all_branches=True)[0]
    by_hand = (coarse - 2 * torch.nn.functional.avg_pool2d(draws.noise, 2)).pow(2).mean()
    torch.testing.assert_close(_loss(model, (1.0, 0.0), draws, x0, labels), by_hand)
    torch.testing.assert_close(_loss(model, (0.25, 1.0), draws, x0, labels), 0.25 * by_hand + plain)
    with pytest.raises(ValueError, match="one weight per branch"):
        _loss(model, (0.25, 0.5, 1.0), draws, x0, labels)
    with pytest.raises(ValueError, match="positive sum"):
        LossConfig(branch_weights=(0.0, 0.0))


def test_time_dependent_layer_norm_is_the_default_of_the_dimr_sizes():
    model = build_model("DiMR-T/2R", image_size=8, in_channels=1, num_classes=3)
    unit = model.branches[0].blocks[0].attn
    assert model.unit.variant == "adaln" and model.unit.gate_source == "tdp"
    assert {n for n, _ in unit.gates.named_parameters()} == {"tdp_p0", "tdp_p1", "tdp_w", "tdp_b"}
    assert not any(p.requires_grad for p in unit.norm.parameters())      # the norm's affine is the TDP


# published (params in millions, GFLOPs as the paper reports them = GMACs) and the latent side
PUBLISHED = {("DiMR-XL/2R", 32): (505, 160), ("DiMR-XL/3R-256", 32): (502, 48), ("DiMR-XL/3R", 64): (525, 206),
             ("DiMR-H/3R", 64): (1030, 399.6), ("DiMR-G/2R", 32): (1060, 331)}


@pytest.mark.parametrize("size,side", list(PUBLISHED))
def test_published_sizes_on_the_meta_device(size, side):
    """Parameters and forward MACs within 3% of the paper's, built on the meta device (no memory).
    The class token is left out (labels cannot be checked on meta): 1 token of 65-257, < 0.5%."""
    with torch.device("meta"):
        model = build_model(size, image_size=side, in_channels=4, num_classes=0)
        x, t = torch.zeros(1, 4, side, side), torch.zeros(1, dtype=torch.long)
        with explicit_attention(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            model(x, t)
    params, gmacs = PUBLISHED[(size, side)]
    assert count_parameters(model) / 1e6 == pytest.approx(params, rel=0.03)
    assert counter.get_total_flops() / 2e9 == pytest.approx(gmacs, rel=0.03)
    assert isinstance(model, MultiResolution) and all(isinstance(b, TransformerBlock) for b in model.branches[1].blocks)


@pytest.mark.parametrize("variant", ["nrdm", "resnet", "adaln-zero"])
def test_a_convnext_first_branch_still_sees_the_condition(variant):
    """The paper's ablation: ConvNeXt blocks in the first branch too, no condition tokens; the class
    reaches the output through the gates or, for gate-less forms, the input conditioning."""
    model = tiny(first_branch="convnext", variant=variant)
    assert not model.branches[0].tokens
    assert not any(type(m).__name__ == "Attention" for m in model.modules())
    x, t, _ = inputs(model)
    assert model(x, t, torch.tensor([0, 0])).shape == x.shape
    assert not torch.allclose(model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="allowed: transformer, convnext"):
        tiny(first_branch="mlp")
