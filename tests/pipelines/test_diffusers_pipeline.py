"""Neural-RDM out, into diffusers: an exported tiny run reloads through from_pretrained with
identical outputs; NRDMPipeline with diffusers' schedulers reproduces our samplers from the same
noise; latent runs carry their VAE; bad exports are explained."""
import pytest
import torch

from nrdm.cli import main as cli_main
from nrdm.config import load_config
from nrdm.diffusion import eps_predictor, sample
from nrdm.factory import load_run
from nrdm.training import train
from tests.conftest import TINY_OVERRIDES

diffusers = pytest.importorskip("diffusers")
from nrdm.pipelines.diffusers_pipeline import NRDMModel, NRDMPipeline  # noqa: E402


@pytest.fixture(scope="module", params=["eps", "v"])
def exported(request, tmp_path_factory):
    """(run directory, exported folder) of a tiny class-conditional U-Net run (2 steps)."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    train(load_config("digits", TINY_OVERRIDES + ["train.steps=2", f"diffusion.prediction={request.param}",
                                                  "sample.sampler=dpm++2m", "sample.spacing=uniform"]), root / "run",
          progress=False)
    assert cli_main(["export", str(root / "run"), "--out", str(root / "folder")]) == 0
    return root / "run", root / "folder"


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_exported_model_reloads_with_identical_outputs(exported):
    run, folder = exported
    cfg, model, schedule, _ = load_run(run)
    reloaded = NRDMModel.from_pretrained(folder / "model").eval()
    x, t, y = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 400, 999]), \
        torch.tensor([1, 5, 10])                                     # 10: the null class
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, y).sample, model(x, t, y))
    pipe = NRDMPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.vae is None
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[cfg.diffusion.prediction]
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), schedule.alphas_cumprod, rtol=1e-5, atol=1e-6)


def test_pipeline_with_dpm_solver_matches_our_dpmpp_2m(exported):
    """diffusers' DPMSolverMultistepScheduler (2M, 'trailing' = our uniform spacing, last step first
    order) against our dpm++2m, guided, from the same noise; float32, tolerance 1e-4."""
    run, folder = exported
    _, model, schedule, _ = load_run(run)
    pipe = quiet(NRDMPipeline.from_pretrained(folder))
    labels = torch.tensor([0, 3, 7])
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = pipe(class_labels=labels, num_inference_steps=8, guidance_scale=2.0, latents=x_T, output_type="latent").images
    ours = sample(eps_predictor(model, schedule, labels, 2.0), x_T, schedule, "dpm++2m", 8)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # the guidance interval and CFG rescale of `nrdm sample`: (0.3, 5] guides some of the 8 steps, not all
    sigma = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()[pipe.scheduler.timesteps]
    assert 0 < int(((sigma > 0.3) & (sigma <= 5)).sum()) < 8
    theirs = pipe(class_labels=labels, num_inference_steps=8, guidance_scale=2.0, guidance_interval=(0.3, 5.0),
                  guidance_rescale=0.7, latents=x_T, output_type="latent").images
    ours = sample(eps_predictor(model, schedule, labels, 2.0, interval=(0.3, 5.0), rescale=0.7), x_T, schedule,
                  "dpm++2m", 8)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    images = pipe(class_labels=[1, 2], num_inference_steps=2).images
    assert len(images) == 2 and images[0].size == (8, 8)


def test_pipeline_with_ddpm_and_learned_variance_matches_ours(tmp_path):
    """A learned-sigma run (a tiny DiT imported) exported: DDPMScheduler with variance_type
    learned_range takes all 2C channels and matches our ddpm with the learned variance ('leading'
    spacing: with 'trailing' diffusers' last step, from t = 99 to clean data, adds noise of the
    learned variance where ours adds none); a scheduler that would cut the output to 3 channels is
    refused with the fix."""
    from tests.models.test_dit_import import tiny_dit
    tiny_dit(in_channels=1, classes=10).save_pretrained(tmp_path / "dit")
    assert cli_main(["import-dit", str(tmp_path / "dit"), "--out", str(tmp_path / "run"), "--preset", "digits",
                     "--set", "data.image_size=8", "--set", "sample.sampler=ddpm", "--set", "sample.spacing=leading"]) == 0
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "folder")]) == 0
    pipe = quiet(NRDMPipeline.from_pretrained(tmp_path / "folder"))
    assert pipe.scheduler.config.variance_type == "learned_range" and pipe.scheduler.config.clip_sample
    _, model, schedule, _ = load_run(tmp_path / "run")
    labels, x_T = torch.tensor([2, 9]), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    theirs = pipe(class_labels=labels, num_inference_steps=10, latents=x_T, output_type="latent",
                  generator=torch.Generator().manual_seed(3)).images
    ours = sample(eps_predictor(model, schedule, labels, with_variance=True), x_T, schedule, "ddpm", 10,
                  variance="learned", spacing="leading", clip_x0=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="variance_type=None"):
        pipe(class_labels=[1], num_inference_steps=2)


def test_latent_run_exports_its_vae(tmp_path, monkeypatch):
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, sample_size=16, scaling_factor=0.7)
    vae.save_pretrained(tmp_path / "vae")
    latent = [f"data.vae={tmp_path / 'vae'}", "data.latent_channels=2", "data.vae_downsample=2", "data.image_size=16",
              "train.steps=2", "model.channel_mult=[1]"]
    train(load_config("digits", TINY_OVERRIDES + latent), tmp_path / "run", progress=False)
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "folder")]) == 0
    pipe = quiet(NRDMPipeline.from_pretrained(tmp_path / "folder"))
    assert pipe.vae.config.scaling_factor == 0.7 and not pipe.scheduler.config.clip_sample
    z = pipe(class_labels=[4], num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    pixels = pipe(class_labels=[4], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert z.images.shape == (1, 2, 8, 8) and pixels.images.shape == (1, 1, 16, 16)
    with torch.no_grad():
        expected = (vae.decode(z.images / 0.7).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(pixels.images, expected)


def test_bad_exports_are_explained(exported, tmp_path, capsys):
    run, folder = exported
    assert cli_main(["export", str(run), "--out", str(folder)]) == 2
    assert "is not empty; choose a new --out" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "f")]) == 2
    assert "error" in capsys.readouterr().err
