"""Feature networks: the TorchScript loading paths (with tiny scripted stand-ins the test builds),
missing-file errors, and the cached domain network."""
import hashlib

import pytest
import torch
from torch import nn

from nrdm.config import DataConfig
from nrdm.metrics.features import TorchScriptI3D, TorchScriptInception, domain_network


class FakeInception(nn.Module):
    """Same call signature as StyleGAN2-ADA's inception-2015-12-05.pt; records its input range."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8
        x = img.float().mean(dim=(2, 3)) / 255.0            # (N, 3) in [0, 1]
        if return_features:
            return x.repeat(1, 2)                           # (N, 6) "pool" features
        return self.proj(x).softmax(-1)                     # (N, 4) "probabilities"


class FakeLayeredInception(nn.Module):
    """A stand-in with the published file's layer names up to mixed_6.conv (1x1 convs and pools
    whose shapes lead to the 17 x 17 map of a 299 x 299 input); its forward is FakeInception's."""

    def __init__(self):
        super().__init__()
        self.head = FakeInception()
        layers = nn.Module()
        for name in ("conv", "conv_1", "conv_2", "conv_3", "conv_4", "mixed", "mixed_1", "mixed_2", "mixed_3",
                     "mixed_4"):
            setattr(layers, name, nn.Conv2d(3, 3, 1))
        layers.pool0, layers.pool1 = nn.MaxPool2d(3, 2), nn.MaxPool2d(3, 2)     # 299 -> 149 -> 74
        layers.mixed_5 = nn.Sequential(nn.MaxPool2d(3, 2), nn.MaxPool2d(3, 2))  # 74 -> 36 -> 17
        layers.mixed_6 = nn.Module()
        layers.mixed_6.conv = nn.Conv2d(3, 9, 1)
        self.layers = layers

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        return self.head(img, return_features, no_output_bias)


class FakeI3D(nn.Module):
    def forward(self, videos: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return videos.mean(dim=(3, 4)).flatten(1)           # (N, 3*T)


def test_torchscript_inception_path(tmp_path, monkeypatch):
    path = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    net = TorchScriptInception(path)
    images = torch.stack([torch.full((1, 8, 8), -1.0), torch.full((1, 8, 8), 1.0)])    # grayscale black, white
    out = net(images)
    assert out["pool"].shape == (2, 6) and out["probs"].shape == (2, 4)
    assert out["pool"][0].max() == 0.0 and out["pool"][1].min() == 1.0              # [-1, 1] -> uint8 0..255
    assert net.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("NRDM_INCEPTION", str(path))
    assert TorchScriptInception().content_hash == net.content_hash


def test_inception_spatial_features_follow_adm(tmp_path):
    """sFID features: mixed_6/conv's first 7 channels, flattened height-width-channel, of the
    input resampled to 299 as the network's own forward does; absent without those layers."""
    torch.manual_seed(0)
    fake = FakeLayeredInception()
    path = tmp_path / "inception.pt"
    torch.jit.script(fake).save(str(path))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    spatial = TorchScriptInception(path)(images)["spatial"]
    assert spatial.shape == (2, 17 * 17 * 7)
    x = ((images + 1) * 127.5).round()
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = (x - 128) / 128
    layers = fake.layers
    for name in TorchScriptInception.SPATIAL_PATH:
        x = getattr(layers, name)(x)
    x = layers.mixed_6.conv(x)[:, :7]
    torch.testing.assert_close(torch.from_numpy(spatial).view(2, 17, 17, 7), x.permute(0, 2, 3, 1), atol=0.05, rtol=0.05)
    torch.jit.script(FakeInception()).save(str(tmp_path / "plain.pt"))
    assert "spatial" not in TorchScriptInception(tmp_path / "plain.pt")(images)


def test_torchscript_i3d_path(tmp_path):
    path = tmp_path / "i3d.pt"
    torch.jit.script(FakeI3D()).save(str(path))
    out = TorchScriptI3D(path)(torch.zeros(2, 1, 4, 8, 8))
    assert out["pool"].shape == (2, 12)                                               # gray -> 3 channels x 4 frames


def test_missing_networks_say_which_file_and_where(monkeypatch, tmp_path):
    monkeypatch.delenv("NRDM_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError, match=r"inception-2015-12-05\.pt.*StyleGAN2-ADA.*NRDM_INCEPTION"):
        TorchScriptInception()
    with pytest.raises(FileNotFoundError, match=r"i3d_torchscript\.pt.*StyleGAN-V.*NRDM_I3D"):
        TorchScriptI3D(tmp_path / "missing.pt")


def test_domain_network_is_trained_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path))
    cfg = DataConfig(name="digits", image_size=8)
    net = domain_network(cfg, epochs=2, progress=False)
    assert net.meta["test_accuracy"] > 0.5 and net.num_classes == 10
    again = domain_network(cfg, epochs=2, progress=False)
    assert again.content_hash == net.content_hash
    feats = net(torch.zeros(3, 1, 8, 8))
    assert feats["pool"].shape == (3, 128) and feats["probs"].shape == (3, 10) and feats["spatial"].shape[0] == 3
    with pytest.raises(ValueError, match="no built-in domain network"):
        domain_network(DataConfig(name="folder", root=str(tmp_path)), progress=False)
