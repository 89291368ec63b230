"""Latent diffusion end to end, offline: train the project's small autoencoder, pre-extract
latents (cached), train on them with the usual trainer, decode at sampling and evaluation."""
import json

import pytest
import torch
from PIL import Image

from nrdm.cli import main as cli_main
from nrdm.config import load_config
from nrdm.factory import build_dataset


def test_autoencoder_latents_train_sample_eval(tmp_path, monkeypatch, tiny_overrides, capsys):
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    ae = tmp_path / "ae"
    assert cli_main(["autoencoder", "digits", "--out", str(ae), "--set", "data.image_size=16", "--latent-channels", "2",
                     "--width", "8", "--levels", "1", "--epochs", "2", "--no-progress"]) == 0
    latent = [f"data.vae={ae}", "data.latent_channels=2", "data.vae_downsample=2", "data.image_size=16"]
    assert cli_main(["latents", "digits", *[a for o in latent for a in ("--set", o)]]) == 0
    assert "train: 1797 latents of shape (2, 8, 8)" in capsys.readouterr().out
    cached = list((tmp_path / "cache" / "latents").iterdir())
    assert len(cached) == 2                                          # train and test splits
    data = build_dataset(load_config("digits", latent).data)         # served from the cache
    latents = data.batch(torch.arange(len(data)))[0]
    assert latents.shape == (1797, 2, 8, 8) and abs(float(latents.std()) - 1) < 0.1

    run = tmp_path / "run"
    sets = [a for o in tiny_overrides + latent + ["train.steps=2", "model.channel_mult=[1]"] for a in ("--set", o)]
    assert cli_main(["train", "digits", "--out", str(run), "--no-progress", *sets]) == 0
    out = tmp_path / "s.png"
    assert cli_main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(out), "--scale", "1"]) == 0
    assert Image.open(out).size == (10 * (16 + 2) + 2, 16 + 2 + 2)     # decoded 16px images, one class per column
    result = tmp_path / "eval.json"
    assert cli_main(["eval", str(run), "--n", "10", "--steps", "2", "--json", str(result), "--domain-epochs", "1"]) == 0
    assert json.loads(result.read_text())["metrics"]["fid"] >= 0    # decoded to 16px pixels for the domain network


def test_latent_shape_mismatch_is_explained(tmp_path):
    from nrdm.models.autoencoder import SmallAutoencoder
    SmallAutoencoder(1, 2, 8, 1).save(tmp_path / "ae")
    cfg = load_config("digits", [f"data.vae={tmp_path / 'ae'}", "data.latent_channels=4", "data.vae_downsample=2"])
    with pytest.raises(ValueError, match="set data.latent_channels=2 and data.vae_downsample=2"):
        build_dataset(cfg.data)
