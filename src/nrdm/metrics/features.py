"""Feature networks for the metrics, all behind one interface:

    net(images in [-1, 1]) -> {"pool": (N, D), "probs": (N, K) or absent, "spatial": (N, S) or absent}

- `TorchScriptInception`: the TorchScript Inception-v3 of StyleGAN2-ADA / EDM / clean-fid
  (`inception-2015-12-05.pt`), loaded from a local file: FID/KID/PR on its 2048-D pool features,
  IS on its 1008-way softmax. It takes uint8 RGB of any size and resizes internally to 299.
- `TorchScriptI3D`: StyleGAN-V's TorchScript I3D (`i3d_torchscript.pt`) for FVD: 400-D
  features of (N, 3, T, H, W) videos in [-1, 1], resized internally to 224.
- `DomainNetwork`: a small CNN the project trains itself on its benchmark data (digits,
  Fashion-MNIST), cached with a content hash, so every metric runs offline and reproducibly.

Every network has `name` and `content_hash` (sha256 of its weights file): recorded beside every
number it produces.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nrdm.metrics.classifier import SmallCNN, accuracy, train_classifier
from nrdm.utils.cache import cache_dir

INCEPTION_ENV = "NRDM_INCEPTION"
I3D_ENV = "NRDM_I3D"
INCEPTION_SOURCE = ("inception-2015-12-05.pt, the TorchScript Inception-v3 published with NVIDIA's "
                    "StyleGAN2-ADA metrics (nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                    "inception-2015-12-05.pt; also used by EDM and clean-fid)")
I3D_SOURCE = ("i3d_torchscript.pt, the TorchScript I3D published with StyleGAN-V's FVD code "
              "(www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt)")


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve(path: str | Path | None, env: str, source: str, what: str) -> Path:
    path = path or os.environ.get(env)
    if not path or not Path(path).is_file():
        where = f"at {path}" if path else f"(no path given and ${env} is not set)"
        raise FileNotFoundError(f"{what} not found {where}. It is {source}. Download it once, then pass its path "
                                f"(--feature-net PATH) or set {env}=/path/to/file.")
    return Path(path)


def _load_torchscript(path: Path, device) -> torch.jit.ScriptModule:
    """The published metric networks are TorchScript files; torch marks the loader deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def _to_rgb(x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    if x.shape[channel_dim] == 1:
        return x.repeat_interleave(3, dim=channel_dim)
    if x.shape[channel_dim] != 3:
        raise ValueError(f"feature networks take 1- or 3-channel inputs, got {x.shape[channel_dim]} channels")
    return x


class _TorchScriptNetwork:
    """A published TorchScript metric network loaded from a local file (path, or $ENV)."""

    env: str
    source: str
    what: str
    prefix: str

    def __init__(self, path: str | Path | None = None, device="cpu"):
        path = _resolve(path, self.env, self.source, self.what)
        self.net = _load_torchscript(path, device)
        self.device = device
        self.name = f"{self.prefix}:{path.name}"
        self.content_hash = file_hash(path)


class TorchScriptInception(_TorchScriptNetwork):
    kind, env, source = "image", INCEPTION_ENV, INCEPTION_SOURCE
    what, prefix = "Inception-v3 TorchScript file", "inception-v3-torchscript"

    SPATIAL_PATH = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                    "mixed_3", "mixed_4", "mixed_5")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """images (N, C, H, W) in [-1, 1] -> uint8 RGB, as the network expects."""
        x = ((_to_rgb(images).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(self.device)
        pool = self.net(x, return_features=True)
        probs = self.net(x, no_output_bias=True)
        out = {"pool": pool.float().cpu().numpy(), "probs": probs.float().cpu().numpy()}
        spatial = self.spatial(x)
        if spatial is not None:
            out["spatial"] = spatial.float().cpu().numpy()
        return out

    def spatial(self, x: torch.Tensor) -> torch.Tensor | None:
        """ADM's sFID features: the first 7 channels of mixed_6/conv (17 x 17 x 7 = 2,023-D, flattened
        height-width-channel as ADM's NHWC graph does, so ADM's mu_s / sigma_s apply). The input is
        prepared as the network's own forward does: resampled to 299 x 299 with TF's pixel grid
        (bilinear, edge clamped), then (x - 128) / 128. None if the file lacks these layers."""
        layers = getattr(self.net, "layers", None)
        if layers is None or not all(hasattr(layers, name) for name in (*self.SPATIAL_PATH, "mixed_6")):
            return None
        h = x.float()
        n, c, height, width = h.shape
        theta = torch.eye(2, 3, device=h.device)
        theta[0, 2] += 1 / width - 1 / 299                       # TF's resize_bilinear sample positions
        theta[1, 2] += 1 / height - 1 / 299
        grid = torch.nn.functional.affine_grid(theta.expand(n, 2, 3), [n, c, 299, 299], align_corners=False)
        h = torch.nn.functional.grid_sample(h, grid, mode="bilinear", padding_mode="border", align_corners=False)
        h = (h - 128) / 128
        for name in self.SPATIAL_PATH:
            h = getattr(layers, name)(h)
        h = layers.mixed_6.conv(h)                               # (N, 192, 17, 17)
        return h[:, :7].permute(0, 2, 3, 1).flatten(1)


class TorchScriptI3D(_TorchScriptNetwork):
    kind, env, source = "video", I3D_ENV, I3D_SOURCE
    what, prefix = "I3D TorchScript file", "i3d-torchscript"

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor) -> dict[str, np.ndarray]:
        """videos (N, C, T, H, W) in [-1, 1] (StyleGAN-V: rescale=False, resize=True)."""
        x = _to_rgb(videos).clamp(-1, 1).float().to(self.device)
        feats = self.net(x, rescale=False, resize=True, return_features=True)
        return {"pool": feats.float().cpu().numpy()}


class DomainNetwork:
    """A SmallCNN classifier on the benchmark data: 'pool' = its 128-D penultimate features,
    'probs' = softmax over the dataset's classes, 'spatial' = the first 7 channels of its last
    feature map (the sFID recipe, on this network)."""

    def __init__(self, model: SmallCNN, name: str, content_hash: str, meta: dict, device="cpu"):
        self.model, self.name, self.content_hash, self.meta = model.eval().to(device), name, content_hash, meta
        self.kind = "video" if model.video else "image"
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        fmap = self.model.features[:-2](images.float().to(self.device))   # (N, 128, [F,] h, w) before pooling
        pool = self.model.features[-2:](fmap)                            # (N, 128)
        probs = self.model.head(pool).softmax(-1)
        out = {"pool": pool.cpu().numpy(), "probs": probs.cpu().numpy()}
        if not self.model.video:
            out["spatial"] = fmap[:, :7].flatten(1).cpu().numpy()
        return out

    @property
    def num_classes(self) -> int:
        return self.model.head.out_features


def domain_network(data_cfg, epochs: int | None = None, progress: bool = True, device="cpu") -> DomainNetwork:
    """The cached domain network for a dataset config (digits, mnist, fashion), trained on its
    train split on first use (deterministic, seconds to minutes on a CPU). epochs=None: about
    30k images' worth of training, 3 to 15 epochs (digits 15, Fashion-MNIST 3)."""
    from nrdm.data.registry import DATASETS, build_dataset, dataset_spec, pixel_config

    spec = dataset_spec(data_cfg.name)
    if not spec.domain_network:
        names = ", ".join(name for name, s in DATASETS.items() if s.domain_network)
        raise ValueError(f"no built-in domain network for data.name={data_cfg.name!r} ({names}); use the "
                         f"Inception network (--feature-net inception) or, for video, I3D (--feature-net i3d)")
    data_key = spec.domain_key(data_cfg) if spec.domain_key else f"{data_cfg.name}-{data_cfg.image_size}px"
    key = f"{data_key}-{'smallcnn3d' if spec.video else 'smallcnn2'}-e{epochs or 'auto'}"
    root = cache_dir() / "feature-nets"
    weights, meta_file = root / f"{key}.safetensors", root / f"{key}.json"
    if not weights.exists():
        train_set = build_dataset(pixel_config(data_cfg, captions=False, split=spec.disjoint_train_split))
        test_set = build_dataset(pixel_config(data_cfg, captions=False, split=spec.held_out_split))
        epochs = epochs or min(15, max(3, 30_000 // (len(train_set) * max(1, data_cfg.frames))))
        model = train_classifier(train_set.images, train_set.labels, train_set.num_classes, epochs=epochs,
                                 progress=progress)
        meta = {"dataset": data_cfg.name, "image_size": data_cfg.image_size, "epochs": epochs,
                "train_images": len(train_set), "test_accuracy": accuracy(model, test_set.images, test_set.labels),
                "num_classes": train_set.num_classes, "in_channels": train_set.channels,
                "video": train_set.images.ndim == 5}
        root.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(meta, indent=2))
        tmp = weights.with_suffix(".tmp")                       # weights last: their presence means done
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(weights)
    meta = json.loads(meta_file.read_text())
    model = SmallCNN(meta["in_channels"], meta["num_classes"], video=meta.get("video", False))
    model.load_state_dict(load_file(str(weights)))
    return DomainNetwork(model, f"domain:{key}", file_hash(weights), meta, device)
