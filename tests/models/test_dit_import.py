"""DiT weights in: a tiny diffusers DiTTransformer2DModel (learned sigma) and the same weights in
the official DiT layout map onto the flow backbone with adaLN-Zero units and give the same
outputs; `nrdm import-dit` makes a run that samples; bad sources get clear errors."""
import argparse

import pytest
import torch

from nrdm.cli import main as cli_main
from nrdm.factory import load_run
from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss, eps_predictor, sample
from nrdm.diffusion.loss import NoiseDraws
from nrdm.models import build_model
from nrdm.models.dit_import import DiTImportError, load_dit
from nrdm.sampling import resolve_variance

diffusers = pytest.importorskip("diffusers")


def tiny_dit(in_channels=2, classes=3, learn_sigma=True):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
                                            out_channels=2 * in_channels if learn_sigma else in_channels,
                                            num_layers=2, sample_size=8, patch_size=2,
                                            num_embeds_ada_norm=classes).eval()
    with torch.no_grad():
        for p in model.parameters():                     # off the zero init: every path acts
            p.normal_(0, 0.1)
        for block in model.transformer_blocks[1:]:       # tied embedders, as in converted DiT checkpoints
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def official_layout(dit) -> dict:
    """The weights of a diffusers DiT in the official DiT state-dict layout (fused qkv, one embedder)."""
    s = dit.state_dict()
    emb = "transformer_blocks.0.norm1.emb."
    out = {"x_embedder.proj.weight": s["pos_embed.proj.weight"], "x_embedder.proj.bias": s["pos_embed.proj.bias"],
           "pos_embed": torch.zeros(1, 16, 16),
           "t_embedder.mlp.0.weight": s[emb + "timestep_embedder.linear_1.weight"],
           "t_embedder.mlp.0.bias": s[emb + "timestep_embedder.linear_1.bias"],
           "t_embedder.mlp.2.weight": s[emb + "timestep_embedder.linear_2.weight"],
           "t_embedder.mlp.2.bias": s[emb + "timestep_embedder.linear_2.bias"],
           "y_embedder.embedding_table.weight": s[emb + "class_embedder.embedding_table.weight"],
           "final_layer.adaLN_modulation.1.weight": s["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": s["proj_out_1.bias"],
           "final_layer.linear.weight": s["proj_out_2.weight"], "final_layer.linear.bias": s["proj_out_2.bias"]}
    for i in range(2):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([s[f"{b}attn1.to_{x}.{kind}"] for x in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = s[f"{b}attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = s[f"{b}ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = s[f"{b}ff.net.2.{kind}"]
            out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = s[f"{b}norm1.linear.{kind}"]
    return out


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 2, 8, 8, generator=g), torch.tensor([0, 500, 999]), torch.tensor([0, 2, 3])


def test_diffusers_dit_imports_with_the_same_outputs(tmp_path):
    dit = tiny_dit()
    dit.save_pretrained(tmp_path / "dit")
    kwargs, state = load_dit(tmp_path / "dit")
    assert (kwargs["learn_sigma"], kwargs["embeddings"], kwargs["num_classes"]) == (True, "diffusers", 3)
    model = build_model(**kwargs).eval()
    model.load_state_dict(state)
    x, t, y = inputs()
    with torch.no_grad():
        theirs = dit(x, timestep=t, class_labels=y).sample
        ours = model(x, t, y)
    assert ours.shape == theirs.shape == (3, 4, 8, 8)                # all 2C channels
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)   # diffusers' MLP norm eps 1e-5 vs 1e-6


def test_official_layout_imports_with_the_same_outputs(tmp_path):
    """The official DiT's timestep frequencies divide by half (diffusers': half - 1): compare with
    diffusers' forward set to the official frequencies."""
    dit = tiny_dit()
    torch.save(official_layout(dit), tmp_path / "dit.pt")
    kwargs, state = load_dit(tmp_path / "dit.pt", heads=2)
    assert kwargs["embeddings"] == "dit" and kwargs["image_size"] == 8
    model = build_model(**kwargs).eval()
    model.load_state_dict(state)
    for block in dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), dit(x, timestep=t, class_labels=y).sample, atol=1e-4, rtol=1e-4)
    raw = {k: torch.zeros_like(v) for k, v in official_layout(dit).items()}
    torch.save({"model": raw, "ema": official_layout(dit), "opt": {}}, tmp_path / "train.pt")
    from_training = load_dit(tmp_path / "train.pt", heads=2)[1]            # a training checkpoint: its EMA
    assert all(torch.equal(from_training[k], state[k]) for k in state)


def test_learned_sigma_trains_and_samples_on_the_prediction_channels():
    """The loss compares the first C channels with the target; the rest (the variance) is not in it."""
    model = build_model(backbone="flow", image_size=8, in_channels=2, width=16, depth=1, heads=2, patch_size=2,
                        num_classes=3, variant="adaln-zero", learn_sigma=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0, _, y = inputs()
    draws = NoiseDraws.sample(x0.shape, 1000, 0.0, torch.Generator().manual_seed(2))
    schedule = VPSchedule("linear")
    loss = diffusion_loss(model, x0, y, schedule, LossConfig(), draws=draws).loss
    out = model(schedule.add_noise(x0, draws.t, draws.noise), draws.t, y)
    torch.testing.assert_close(loss, (out[:, :2] - draws.noise).pow(2).mean())


def imported(tmp_path):
    dit = tiny_dit()
    dit.save_pretrained(tmp_path / "dit")
    kwargs, state = load_dit(tmp_path / "dit")
    model = build_model(**kwargs).eval()
    model.load_state_dict(state)
    return dit, model


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_learned_variance_ddpm_matches_diffusers_ddpm_scheduler(tmp_path, cfg):
    """Our ddpm with variance 'learned' against diffusers' DDPMScheduler (learned_range) stepping the
    same DiT's 2C-channel output from the same noise; 10 'leading' steps, float32. Guided, as DiT's
    forward_with_cfg: the eps channels guided, the variance channels the conditional pass's.
    Tolerance 1e-4: the schedules differ in float64 (ours) against float32 (theirs)."""
    dit, model = imported(tmp_path)
    y = torch.tensor([0, 2, 1])
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
    scheduler.set_timesteps(10)
    theirs, noise = x_T.clone(), torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = dit(torch.cat([theirs, theirs]), timestep=t.expand(6), class_labels=torch.cat([y, torch.full_like(y, 3)])).sample
            cond, uncond = out.chunk(2)                              # the null class is 3
            eps = uncond[:, :2] + cfg * (cond[:, :2] - uncond[:, :2])
            theirs = scheduler.step(torch.cat([eps, cond[:, 2:]], 1), t, theirs, generator=noise).prev_sample
    schedule = VPSchedule("linear")

    def ours(variance):
        return sample(eps_predictor(model, schedule, y, cfg, with_variance=variance == "learned"), x_T, schedule, "ddpm",
                      10, variance=variance, spacing="leading", generator=torch.Generator().manual_seed(4))

    torch.testing.assert_close(ours("learned"), theirs, atol=1e-4, rtol=1e-4)
    assert (ours("fixed-small") - theirs).abs().max() > 1e-2        # the learned variance made the difference


def test_dit_pipeline_with_ddpm_and_our_sampler_give_the_same_images(tmp_path):
    """diffusers' DiTPipeline (DDPMScheduler: fixed-small variance, x0 clipped to [-1, 1]; it steps
    the prediction channels only) and our ddpm from the same noise, decoded by the same tiny VAE.
    The pipeline draws its steps' noise from the global generator. Tolerance 1e-4 (float32)."""
    dit, model = imported(tmp_path)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(8,),
                                  norm_num_groups=4, sample_size=16).eval()
    pipe = diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 2, 1]
    torch.manual_seed(7)
    images = pipe(labels, guidance_scale=1.0, generator=torch.Generator().manual_seed(3), num_inference_steps=10,
                  output_type="pt").images
    schedule = VPSchedule("linear")
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    latents = sample(eps_predictor(model, schedule, torch.tensor(labels)), x_T, schedule, "ddpm", 10,
                     variance="fixed-small", spacing="leading", clip_x0=1.0, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == ours.shape == (3, 3, 8, 8)
    torch.testing.assert_close(ours, images, atol=1e-4, rtol=1e-4)


def test_sample_variance_auto_follows_the_model():
    shape = dict(backbone="flow", image_size=8, in_channels=2, width=16, depth=1, heads=2, patch_size=2)
    sigma, plain = build_model(**shape, learn_sigma=True), build_model(**shape)
    assert (resolve_variance(sigma, "auto"), resolve_variance(plain, "auto")) == ("learned", "fixed-small")
    assert resolve_variance(sigma, "fixed-large") == "fixed-large"
    with pytest.raises(ValueError, match="no variance output \\(model.learn_sigma: false\\)"):
        resolve_variance(plain, "learned")


def test_import_dit_cli_makes_a_run_that_samples(tmp_path, capsys):
    dit = tiny_dit(in_channels=1, classes=10)
    dit.save_pretrained(tmp_path / "dit")
    run = tmp_path / "run"
    args = ["import-dit", str(tmp_path / "dit"), "--out", str(run), "--preset", "digits", "--set", "data.image_size=8"]
    assert cli_main(args) == 0
    cfg = load_run(run)[0]
    assert (cfg.model.learn_sigma, cfg.diffusion.vlb_weight, cfg.diffusion.schedule, cfg.diffusion.prediction) == \
        (True, 1.0, "linear", "eps")                                 # DiT's diffusion and hybrid loss
    assert cli_main(args) == 2 and "already holds a run" in capsys.readouterr().err
    out = tmp_path / "s.png"
    assert cli_main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(out), "--class", "3"]) == 0
    assert out.exists()
    assert cli_main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(out), "--sampler", "ddpm"]) == 0
    wrong = ["import-dit", str(tmp_path / "dit"), "--out", str(tmp_path / "x"), "--preset", "digits"]
    assert cli_main(wrong) == 2
    assert "takes (channels, side, classes) = (1, 8, 10)" in capsys.readouterr().err


def test_bad_sources_are_explained(tmp_path):
    with pytest.raises(DiTImportError, match="does not exist"):
        load_dit(tmp_path / "missing.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(DiTImportError, match="not a DiT state dict in the official DiT layout"):
        load_dit(tmp_path / "other.pt")
    torch.save({"args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "pickle.pt")
    with pytest.raises(DiTImportError, match="weights-only"):
        load_dit(tmp_path / "pickle.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiTImportError, match="not a diffusers folder"):
        load_dit(tmp_path / "empty")
    dit = tiny_dit()
    with torch.no_grad():
        dit.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    dit.save_pretrained(tmp_path / "untied")
    with pytest.raises(DiTImportError, match="untied per-block embedders"):
        load_dit(tmp_path / "untied")
