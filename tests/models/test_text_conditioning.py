"""Text-conditional backbones: pooled text in c (all backbones), text tokens in context (token
backbones), the stored empty caption as the null condition for guidance and caption dropout."""
import pytest
import torch

from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss, eps_predictor, guided_output
from nrdm.models import build_model
from nrdm.models.text_encoders import TextEmbeddings

SIZES = {"flow": ("DiT-T/2", 4), "u-transformer": ("U-ViT-T/2", 4), "unet": ("UNet-T", 0), "video": ("Latte-T/2", 0),
         "multires": ("DiMR-T/2R", 4)}


def text(batch, dim=12, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.randint(2, length + 1, (batch, 1), generator=g)
    tokens = torch.randn(batch, length, dim, generator=g) * mask[..., None]
    return TextEmbeddings(torch.randn(batch, dim, generator=g), tokens, mask)


def model_for(backbone, **kw):
    torch.manual_seed(0)
    size, tokens = SIZES[backbone]
    extra = {"num_frames": 2} if backbone == "video" else {}
    extra |= {"text_tokens": tokens} if tokens else {}
    model = build_model(size, image_size=8, in_channels=1, text_dim=12, num_classes=10, **extra, **kw)
    with torch.no_grad():                                            # leave the zero init: every path acts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.embed.text.set_null(text(1, seed=99))
    return model


@pytest.mark.parametrize("backbone", list(SIZES))
def test_text_reaches_the_output(backbone):
    model = model_for(backbone)
    assert model.conditional and model.num_classes == 0             # text replaces the class labels
    x = torch.randn(2, *model.sample_shape)
    t = torch.tensor([100, 700])
    a, b = text(2, seed=1), text(2, seed=2)
    out = model(x, t, a)
    assert out.shape == x.shape and not torch.allclose(out, model(x, t, b))
    garbage = TextEmbeddings(a.pooled, a.tokens + 5.0 * ~a.mask[..., None], a.mask)
    torch.testing.assert_close(model(x, t, garbage), out)          # masked token slots carry nothing
    null = model.null_condition(2)
    torch.testing.assert_close(null.pooled, text(1, seed=99).pooled.expand(2, -1))
    with pytest.raises(ValueError, match="text-conditional: pass TextEmbeddings"):
        model(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="have 7 features, the model expects 12"):
        model(x, t, text(2, dim=7))


def test_empty_caption_guidance_and_caption_dropout():
    model = model_for("flow")
    schedule = VPSchedule()
    x, t, cond = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), text(3, seed=5)
    null_out = model(x, t, model.null_condition(3))
    torch.testing.assert_close(guided_output(model, x, t, cond, 0.0), null_out)
    torch.testing.assert_close(guided_output(model, x, t, cond, 1.0), model(x, t, cond))
    torch.testing.assert_close(eps_predictor(model, schedule, None)(x, t), schedule.to_eps(null_out, x, t))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    diffusion_loss(model, x, cond, schedule, LossConfig(label_drop=1.0))
    diffusion_loss(model, x, cond, schedule, LossConfig(label_drop=0.0))
    torch.testing.assert_close(seen[0].pooled, model.null_condition(3).pooled)
    torch.testing.assert_close(seen[1].pooled, cond.pooled)


def test_null_text_is_saved_with_the_weights():
    model = model_for("u-transformer")
    fresh = build_model("U-ViT-T/2", image_size=8, in_channels=1, text_dim=12, text_tokens=4)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.null_condition(1).tokens, model.null_condition(1).tokens)
