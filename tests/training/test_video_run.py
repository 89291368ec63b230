"""A video model through the same trainer, samplers, checkpoints and CLI as images: train, sample
(GIF + MP4 + frame grid), evaluate (FVD with the built-in video network); config mismatches."""
import json

import pytest
import torch
from PIL import Image

from nrdm.cli import main as cli_main
from nrdm.config import load_config
from nrdm.factory import validate

TINY_VIDEO = ["model.width=16", "model.depth=2", "model.heads=2", "data.image_size=8", "data.frames=4",
              "data.digit_size=4", "data.num_clips=64", "train.steps=2", "train.batch_size=4", "train.log_every=1",
              "train.ckpt_every=2", "train.warmup_steps=1", "sample.n=4", "sample.steps=2"]


LATTE = ["model.backbone=video", "model.patch_size=2", "model.mlp_ratio=4"]


@pytest.mark.parametrize("backbone", ["preset", "latte"])   # the preset's space-time U-Net; Latte-like
def test_video_train_sample_eval(tmp_path, monkeypatch, backbone):
    pytest.importorskip("imageio_ffmpeg")
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    sets = [a for o in TINY_VIDEO + (LATTE if backbone == "latte" else []) for a in ("--set", o)]
    assert cli_main(["train", "moving-digits", "--out", str(run), "--no-progress", *sets]) == 0
    assert {p.name for p in (run / "samples").iterdir()} == {"step-00000002.gif", "step-00000002.mp4",
                                                               "step-00000002-frames.png"}
    assert cli_main(["sample", str(run), "--n", "3", "--steps", "2", "--out", str(tmp_path / "s.gif")]) == 0
    assert all((tmp_path / name).exists() for name in ("s.gif", "s.mp4", "s-frames.png"))
    out = tmp_path / "eval.json"
    assert cli_main(["eval", str(run), "--n", "8", "--steps", "2", "--json", str(out), "--domain-epochs", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["fvd"] >= 0 and "fid" not in result["metrics"]
    assert 0 <= result["metrics"]["class_accuracy"] <= 1
    assert result["protocol"]["feature_network"].startswith("domain:moving-digits-8px-f4")


def test_video_data_needs_a_video_backbone():
    with pytest.raises(ValueError, match="video needs model.backbone=video"):
        validate(load_config("moving-digits", ["model.backbone=flow"]))
    with pytest.raises(ValueError, match="model.backbone=video needs video data"):
        validate(load_config("digits", ["model.backbone=video", "model.size=null"]))
    with pytest.raises(ValueError, match="needs a video dataset"):
        validate(load_config("digits", ["data.frames=4", "model.backbone=video", "model.size=null"]))


def test_latent_video_train_sample_eval(tmp_path, monkeypatch, capsys):
    """Latte-style latent video: an image autoencoder trained on the frames, clips encoded frame by
    frame and cached, the Latte-like model trained on (c, F, h, w) latents, samples decoded to
    pixel clips for the GIF/MP4/frame grid and for FVD."""
    pytest.importorskip("imageio_ffmpeg")
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    data = ["data.image_size=8", "data.frames=4", "data.digit_size=4", "data.num_clips=64"]
    ae = tmp_path / "ae"
    assert cli_main(["autoencoder", "moving-digits", "--out", str(ae), *[a for o in data for a in ("--set", o)],
                     "--latent-channels", "2", "--width", "8", "--levels", "1", "--epochs", "1", "--no-progress"]) == 0
    assert "latents 2x4px" in capsys.readouterr().out
    latent = [f"data.vae={ae}", "data.latent_channels=2", "data.vae_downsample=2"]
    run = tmp_path / "run"
    sets = [a for o in TINY_VIDEO + LATTE + latent + ["model.patch_size=1"] for a in ("--set", o)]
    assert cli_main(["train", "moving-digits", "--out", str(run), "--no-progress", *sets]) == 0
    [cached] = (tmp_path / "cache" / "latents").iterdir()
    from nrdm.data.latents import LatentShards
    assert LatentShards(cached).batch(torch.arange(64))[0].shape == (64, 2, 4, 4, 4)   # (clips, c, F, h, w)
    out = tmp_path / "s.gif"
    assert cli_main(["sample", str(run), "--n", "3", "--steps", "2", "--out", str(out), "--scale", "1"]) == 0
    assert Image.open(tmp_path / "s-frames.png").size == (4 * (8 + 2) + 2, 3 * (8 + 2) + 2)   # 8px pixel frames
    result = tmp_path / "eval.json"
    assert cli_main(["eval", str(run), "--n", "8", "--steps", "2", "--json", str(result), "--domain-epochs", "1"]) == 0
    assert json.loads(result.read_text())["metrics"]["fvd"] >= 0
