"""Every backbone (image and video) x every variant: shapes, finite gradients, identity at init, conditioning,
bad-input errors, FLOP counts against a closed form, and overfitting one batch."""
import pytest
import torch

from nrdm.diffusion import VPSchedule
from nrdm.models import VARIANTS, GatedResidual, build_model, count_flops, gated_units

TINY = {"flow": "DiT-T/2", "u-transformer": "U-ViT-T/2", "unet": "UNet-T", "video": "Latte-T/2",
        "video-unet": "UNet-T",     # the space-time U-Net: the conv U-Net with num_frames > 0
        "multires": "DiMR-T/2R"}


def tiny(backbone, variant="nrdm", **kw):
    """A tiny model of the backbone; gates from the conditioning (the DiMR sizes default to time-only)."""
    torch.manual_seed(0)
    video = {"num_frames": 3} if backbone.startswith("video") else {}
    kw = {"image_size": 8, "in_channels": 2, "num_classes": 3, "gate_source": "cond", **video, **kw}
    return build_model(TINY[backbone], variant=variant, **kw)


def every_output(model, x, t, labels):
    """All predictions the model makes: a multires model's every branch, else its one output."""
    return model(x, t, labels, all_branches=True) if hasattr(model, "branches") else [model(x, t, labels)]


def inputs(model, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    t = torch.randint(0, model.num_timesteps, (batch,), generator=g)
    labels = torch.randint(0, model.num_classes + 1, (batch,), generator=g) if model.num_classes else None
    return x, t, labels


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backbone", list(TINY))
def test_shape_and_finite_backward(backbone, variant):
    model = tiny(backbone, variant)
    x, t, labels = inputs(model)
    out = model(x, t, labels)
    assert out.shape == x.shape
    # the zero-initialised output layer makes the first gradient reach only the head; perturb it
    # so the gradient flows through every unit
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    sum(out.pow(2).mean() for out in every_output(model, x, t, labels)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    for unit in gated_units(model):
        assert any(p.grad.abs().sum() > 0 for p in unit.parameters()), "a unit received no gradient"


@pytest.mark.parametrize("variant", ["nrdm", "rezero", "adaln-zero"])
@pytest.mark.parametrize("backbone", list(TINY))
def test_every_unit_is_identity_at_init(backbone, variant):
    model = tiny(backbone, variant)
    seen = []

    def check(unit, args, out):
        seen.append(unit)
        assert torch.equal(out, args[0])

    hooks = [u.register_forward_hook(check) for u in gated_units(model)]
    model(*inputs(model))
    for h in hooks:
        h.remove()
    assert len(seen) == len(gated_units(model)) > 0


@pytest.mark.parametrize("backbone", list(TINY))
def test_unconditional_and_class_conditional(backbone):
    model = tiny(backbone, num_classes=0)
    x, t, _ = inputs(model)
    assert model(x, t).shape == x.shape
    cond_model = tiny(backbone)
    with pytest.raises(ValueError, match="class-conditional"):
        cond_model(x, t)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        cond_model(x, t, torch.tensor([0, 7]))


@pytest.mark.parametrize("backbone", list(TINY))
def test_labels_change_output_for_every_variant(backbone):
    """The conditioning reaches every variant (gates, condition tokens or input injection)."""
    for variant in VARIANTS:
        model = tiny(backbone, variant)
        with torch.no_grad():                       # leave init: make gates and heads non-zero
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        x, t, _ = inputs(model)
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([1, 1]))
        assert not torch.allclose(a, b), variant


def test_depth_is_an_independent_knob():
    shallow = build_model("DiT-T/2", image_size=8, in_channels=2, depth=2)
    deep = build_model("DiT-T/2", image_size=8, in_channels=2, depth=6)
    assert len(gated_units(deep)) == 3 * len(gated_units(shallow)) == 12
    assert deep.blocks[0].attn.body.qkv.in_features == shallow.blocks[0].attn.body.qkv.in_features


def test_skip_scaling_constant_and_learned():
    for backbone in ["u-transformer", "unet"]:
        for mode in ["constant", "learned"]:
            model = tiny(backbone, skip_scaling=mode, skip_kappa=0.7)
            x, t, labels = inputs(model)
            assert model(x, t, labels).shape == x.shape
    scaler = tiny("u-transformer", skip_scaling="constant", skip_kappa=0.5).skip_scale
    skip = torch.ones(1, 2, 3)
    assert scaler(skip, 1).eq(1).all() and scaler(skip, 3).eq(0.25).all()   # kappa^(i-1)


def test_bad_input_errors_name_allowed_values():
    with pytest.raises(ValueError, match=r"allowed: nrdm, adaln, scaled-skip, resnet, rezero, adaln-zero"):
        build_model("DiT-T/2", variant="highway")
    with pytest.raises(ValueError, match=r"allowed patch sizes: \[1, 2, 3, 4, 6, 12\]"):
        build_model("DiT-T/2", image_size=12, patch_size=5)
    with pytest.raises(ValueError, match=r"allowed heads: \[1, 2, 4, 8, 16, 32, 64\]"):
        build_model("DiT-T/2", heads=3)
    with pytest.raises(ValueError, match=r"allowed heads"):
        build_model("U-ViT-T/2", width=48, heads=5)
    with pytest.raises(ValueError, match="divisible by 2"):
        build_model("UNet-T", image_size=9)
    with pytest.raises(ValueError, match="allowed: flow, u-transformer, unet"):
        build_model(backbone="mlp")
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("DiT-Q/2")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['widht'\].*valid: .*width"):
        build_model("DiT-T/2", widht=32)
    model = tiny("flow")
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 2, 8, 8\)"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_flops_of_one_block_match_closed_form():
    """FLOPs(depth 2) - FLOPs(depth 1) = one nrdm transformer block, counted by hand
    (multiply-adds x 2; norms, softmax and element-wise ops are not counted):
    gate heads 2 x (D -> 2D), qkv N D 3D, scores + weighted sum 2 N^2 D, proj N D^2, MLP 2 N D 4D."""
    D, N = 64, 16
    kw = dict(image_size=8, in_channels=2, patch_size=2, width=D, heads=4, variant="nrdm")
    one = count_flops(build_model(backbone="flow", depth=1, **kw))
    two = count_flops(build_model(backbone="flow", depth=2, **kw))
    macs = 2 * D * 2 * D + N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * 4 * D
    assert two - one == 2 * macs


@pytest.mark.parametrize("backbone", list(TINY))
def test_tiny_model_overfits_one_batch(backbone):
    """Fixed (x0, t, noise, labels): the denoising MSE must fall at least 10x."""
    model = tiny(backbone, image_size=8, in_channels=1)
    schedule = VPSchedule("linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *model.sample_shape, generator=g).clamp(-1, 1)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    labels = torch.tensor([0, 1, 2, 0])
    xt = schedule.add_noise(x0, t, noise)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = (model(xt, t, labels) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < losses[0] / 10, (losses[0], losses[-10:])


def test_units_are_the_only_residual_updates():
    """Every transformer block / conv stage is made of GatedResidual units (one concept, one place)."""
    model = tiny("unet")
    n_units = sum(isinstance(m, GatedResidual) for m in model.modules())
    # UNet-T: 2 levels x 1 stage down + up (conv, +attention at res <= 16: all) + middle (conv, attn, conv)
    assert n_units == 2 * (2 * 2) + 3


@pytest.mark.parametrize("backbone", list(TINY))
def test_gradient_checkpointing_gives_the_same_gradients(backbone):
    grads = []
    for checkpointing in (False, True):
        model = tiny(backbone)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)       # leave init so every unit gets a gradient
        model.grad_checkpointing = checkpointing
        x, t, labels = inputs(model)
        sum(out.pow(2).mean() for out in every_output(model, x, t, labels)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_video_blocks_mix_only_within_a_frame_or_across_frames():
    """Perturb one token (frame f, position n): a spatial block may change only frame f (all its
    positions), a temporal block only position n (all frames)."""
    for variant in VARIANTS:
        model = tiny("video", variant, num_frames=4)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)        # leave the identity init so every branch acts
        B, F, N, D = 2, 4, model.pos_embed.shape[2], model.pos_embed.shape[3]
        z = torch.randn(B, F, N, D)
        cond = model.embed(torch.tensor([10, 900]), torch.tensor([0, 1]))[0]
        per_frame, per_position = cond.repeat_each(F), cond.repeat_each(N)
        bumped = z.clone()
        bumped[:, 1, 2] += torch.randn(D)               # not a constant: LayerNorm would remove that
        for index, kind in ((0, "spatial"), (1, "temporal")):
            with torch.no_grad():
                change = (model.apply_block(index, bumped, per_frame, per_position)
                          - model.apply_block(index, z, per_frame, per_position)).abs().amax(dim=(0, 3))  # (F, N)
            touched = change > 1e-6
            expected = torch.zeros(F, N, dtype=torch.bool)
            if kind == "spatial":
                expected[1] = True
            else:
                expected[:, 2] = True
            assert torch.equal(touched, expected), (variant, kind, touched)
    # through the whole model a change in one frame reaches every frame
    model = tiny("video", "resnet", num_frames=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, t, labels = inputs(model)
    bumped = x.clone()
    bumped[:, :, 1] += torch.randn_like(bumped[:, :, 1])
    with torch.no_grad():
        change = (model(bumped, t, labels) - model(x, t, labels)).abs().amax(dim=(0, 1, 3, 4))   # (F,)
    assert (change > 1e-6).all()


def test_space_time_unet_mixes_frames_only_in_its_temporal_units():
    """The space-time U-Net: temporal attention changes, at one pixel, every frame of that clip and
    nothing else; without its temporal units the net handles each frame alone; with them a change
    in one frame reaches every frame of that clip (and never another clip)."""
    from nrdm.models.layers import TemporalAttention

    torch.manual_seed(0)
    attn = TemporalAttention(8, 2, num_frames=4)
    x = torch.randn(2 * 4, 8, 3, 3)                     # 2 clips x 4 frames
    bumped = x.clone()
    bumped[4 + 1, :, 2, 0] += 1.0                       # clip 1, frame 1, pixel (2, 0)
    with torch.no_grad():
        touched = (attn(bumped) - attn(x)).abs().amax(dim=1) > 1e-6        # (8, 3, 3)
    expected = torch.zeros(8, 3, 3, dtype=torch.bool)
    expected[4:, 2, 0] = True
    assert torch.equal(touched, expected)

    model = tiny("video-unet", "nrdm", num_frames=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)           # leave the identity init so every unit acts
    x, t, labels = inputs(model)
    bumped = x.clone()
    bumped[1, :, 2] += torch.randn_like(bumped[1, :, 2])   # clip 1, frame 2

    def changed_frames():
        with torch.no_grad():
            return (model(bumped, t, labels) - model(x, t, labels)).abs().amax(dim=(1, 3, 4)) > 1e-6  # (B, F)

    assert torch.equal(changed_frames(), torch.tensor([[False] * 4, [True] * 4]))
    stages = [m for m in model.modules() if hasattr(m, "temporal")]
    assert stages and all(s.temporal is not None for s in stages)
    for stage in stages:
        stage.temporal = None
    assert torch.equal(changed_frames(), torch.tensor([[False] * 4, [False, False, True, False]]))


def test_space_time_unet_temporal_resolution_sets_where_frames_mix():
    model = tiny("video-unet", temporal_resolution=4)     # 8px input: levels at 8 and 4 px
    has_temporal = [stage.temporal is not None for stage in (*model.down[0], *model.down[1], model.middle)]
    assert has_temporal == [False, True, True]
    image_model = tiny("unet", temporal_resolution=4)     # images: no temporal units at all
    assert not any(getattr(m, "temporal", None) is not None for m in image_model.modules())


def test_u_transformer_starts_with_identity_output_conv_and_sincos_positions():
    """The two initialisations that made the U-shaped transformer learn ~5x faster (loss after
    300 digits steps 0.40 -> 0.054, docs/design.md): the final 3x3 conv starts as the identity,
    the learned position embedding starts at the 2-D sin-cos table (extra tokens at 0)."""
    from nrdm.models.layers import sincos_pos_embed_2d
    model = build_model("U-ViT-T/2", image_size=8, in_channels=2, num_classes=3)
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(model.out_conv(x), x)
    torch.testing.assert_close(model.pos_embed[0, model.n_extra:], sincos_pos_embed_2d(64, 4))
    assert model.pos_embed[0, :model.n_extra].abs().max() == 0


@pytest.mark.parametrize("size", ["DiT-T/2", "U-ViT-T/2", "UNet-T"])
def test_class_is_as_visible_as_time_in_the_conditioning_at_init(size):
    """c = t_emb + y_emb feeds zero-initialised gate heads: at init c must vary with the class at
    least as much as with the time (a class embedding 7x below the time embedding made the flow
    transformer ignore the class: accuracy 0.16 after 500 digits steps, 0.99 with N(0, 1))."""
    torch.manual_seed(0)
    model = build_model(size, image_size=8, in_channels=1, num_classes=10)
    t = torch.arange(0, 1000, 100)
    over_time = model.embed.time(t).std(0).mean()
    over_class = model.embed.label(torch.arange(10)).std(0).mean()
    assert over_class >= over_time


@pytest.mark.parametrize("backbone", ["flow", "u-transformer", "video", "multires"])
def test_activation_option_reaches_every_mlp_and_keeps_the_weights(backbone):
    """activation="gelu" (exact erf GELU) changes only the MLPs' nonlinearity: the same parameters,
    outputs within GELU's tanh-approximation error, and every MLP computes fc2(gelu(fc1(x)))."""
    from nrdm.models.layers import GatedMlp, Mlp
    tanh_model, exact_model = tiny(backbone), tiny(backbone, activation="gelu")
    with torch.no_grad():                                   # non-zero gates and heads: every branch counts
        for p in tanh_model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    exact_model.load_state_dict(tanh_model.state_dict())
    x, t, labels = inputs(tanh_model)
    with torch.no_grad():
        difference = (tanh_model(x, t, labels) - exact_model(x, t, labels)).abs().max().item()
    assert 0 < difference < 0.05
    mlps = [m for m in exact_model.modules() if isinstance(m, (Mlp, GatedMlp))]
    assert mlps
    h = torch.randn(5, mlps[0].fc1.in_features)
    a = mlps[0].fc1(h)
    expected = (mlps[0].fc2(torch.nn.functional.gelu(a)) if isinstance(mlps[0], Mlp) else
                mlps[0].fc2(torch.nn.functional.gelu(a.chunk(2, -1)[0]) * a.chunk(2, -1)[1]))
    torch.testing.assert_close(mlps[0](h), expected, rtol=0, atol=0)


def test_activation_config_key_and_bad_value():
    from nrdm.config import load_config
    from nrdm.factory import build_model_from_config
    from nrdm.models.layers import Mlp
    model = build_model_from_config(load_config("digits-flow", ["model.activation=gelu", "model.depth=1"]))
    assert all(m.act is torch.nn.functional.gelu for m in model.modules() if isinstance(m, Mlp))
    with pytest.raises(ValueError, match=r"unknown activation 'relu'; allowed: gelu-tanh, gelu"):
        build_model("DiT-T/2", activation="relu")


def test_out_of_range_class_labels_get_a_clear_error():
    model = tiny("flow")                      # 3 classes: labels 0..2, 3 the null class
    x, t, _ = inputs(model)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\] \(3 = null class\); got range \[0, 4\]"):
        model(x, t, torch.tensor([0, 4]))
    model(x, t, torch.tensor([0, 3]))         # the null class is valid
