"""Latent pipeline: a tiny randomly initialised diffusers AutoencoderKL (built by the test) and the
project's own small autoencoder behind one interface; posterior draws; clips frame by frame."""
import pytest
import torch

from nrdm.models.autoencoder import SmallAutoencoder, build_codec


@pytest.fixture
def tiny_vae_dir(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_diffusers_vae_round_trip_shapes_and_scaling(tiny_vae_dir):
    codec = build_codec(str(tiny_vae_dir))
    assert (codec.latent_channels, codec.downsample, codec.scale) == (4, 2, 0.5)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (3, 4, 8, 8)
    torch.testing.assert_close(z, codec.vae.encode(x).latent_dist.mean * 0.5)     # z = scale * posterior mean
    out = codec.decode(z)
    assert out.shape == x.shape and out.abs().max() <= 1


def test_posterior_draws_are_seeded_per_sample(tiny_vae_dir):
    """seeds: z = scale * (mean + std * noise), sample i's noise from its own seed, so a draw does
    not depend on the batch it is in; a deterministic encoder refuses."""
    codec = build_codec(str(tiny_vae_dir))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    seeds = torch.tensor([5, 6, 7])
    z = codec.encode(x, seeds=seeds)
    posterior = codec.vae.encode(x).latent_dist
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(7 * 4096))
    torch.testing.assert_close(z[2], 0.5 * (posterior.mean[2] + posterior.std[2] * noise))
    torch.testing.assert_close(codec.encode(x[1:], seeds=seeds[1:]), z[1:])
    assert not torch.allclose(z, codec.encode(x))
    with pytest.raises(ValueError, match="deterministic: it has no posterior"):
        SmallAutoencoder(3, 2, 8, 1).encode(x, seeds=seeds)


def test_small_autoencoder_trains_saves_and_loads(tmp_path):
    from nrdm.data.datasets import load_digits_dataset
    images = load_digits_dataset(16).images[:256]
    ae = SmallAutoencoder(in_channels=1, latent_channels=2, width=8, levels=1)
    with torch.no_grad():
        before = float((ae.decoder(ae.encoder(images)) - images).pow(2).mean())
    stats = ae.fit(images, epochs=3, batch_size=64, progress=False)
    assert stats["mse"] < before / 2
    codec = build_codec(str(ae.save(tmp_path / "ae")))
    z = codec.encode(images)
    assert z.shape == (256, 2, 8, 8) and abs(float(z.std()) - 1) < 0.05 and abs(float(z.mean())) < 0.05
    torch.testing.assert_close(codec.decode(z), ae.decode(ae.encode(images)))
    assert codec.identity.startswith("small-autoencoder:") and codec.identity != "small-autoencoder:untrained"


def test_clips_are_encoded_and_decoded_frame_by_frame(tmp_path):
    """An image autoencoder on clips (B, C, F, H, W): frame f of the latent clip is the latent of
    frame f alone, in any batch of frames; other ranks are refused with the expected shapes."""
    torch.manual_seed(0)
    codec = SmallAutoencoder(1, 2, 8, 1)
    clips = torch.rand(3, 1, 5, 8, 8) * 2 - 1
    latents = codec.encode(clips)
    assert latents.shape == (3, 2, 5, 4, 4)
    torch.testing.assert_close(latents[:, :, 2], codec.encode(clips[:, :, 2]))
    decoded = codec.decode(latents)
    assert decoded.shape == clips.shape
    torch.testing.assert_close(decoded[1, :, 4], codec.decode(latents[1:2, :, 4])[0])
    from nrdm.data.datasets import TensorImages
    from nrdm.data.latents import extract_latent_shards
    stored = extract_latent_shards(TensorImages(clips, torch.zeros(3), 1, "clips"), lambda x, i: codec.encode(x),
                                   tmp_path / "c", {}, shard_size=2, batch_size=2, progress=False)
    assert stored.num_frames == 5
    torch.testing.assert_close(stored.batch(torch.arange(3))[0], latents)
    with pytest.raises(ValueError, match=r"expected images \(B, C, H, W\) or clips \(B, C, F, H, W\)"):
        codec.encode(clips[0, 0])
