"""Latent diffusion: autoencoders behind one interface, and latent pre-extraction.

    codec = build_codec("stabilityai/sd-vae-ft-ema")     # diffusers AutoencoderKL (path or hub name)
    codec = build_codec("runs/ae-fashion")               # an autoencoder this project trained
    z = codec.encode(images)                              # (B, C, H, W) in [-1, 1] -> scaled latents
    images = codec.decode(z)
    z = codec.encode(clips)                               # (B, C, F, H, W): frame by frame -> (B, c, F, h, w)

Latents are scaled so they have roughly unit variance (SD-VAE: z = scaling_factor * mean), the
scale the diffusion schedule expects. Encoding takes the posterior mean by default, so extracted
latents are deterministic; `encode(images, seeds=...)` draws from the posterior instead (DiT's
`latent_dist.sample()`), its noise seeded per sample so that it is reproducible as well. Storing
latents on disk is nrdm.data.latents.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nrdm.utils.optional import loading, require


class LatentCodec(nn.Module):
    """Base: subclasses set latent_channels, downsample, identity; implement _moments (images ->
    posterior mean and std, std None for a deterministic encoder) and _decode on unscaled latents.
    The scaling (z = scale * (latent - shift)) lives here."""

    in_channels: int
    latent_channels: int
    downsample: int
    identity: str
    scale: float = 1.0
    shift: float = 0.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, [F,] H, W) in [-1, 1] -> scaled latents (B, c, [F,] H/f, W/f): the posterior mean, or
        with seeds (one int per sample) mean + std * noise, the noise of frame f of sample i drawn
        from a generator seeded by seeds[i] * 4096 + f."""
        frames = images.shape[2] if images.dim() == 5 else 1
        frame_seeds = None if seeds is None else (torch.as_tensor(seeds).long()[:, None] * 4096
                                                  + torch.arange(frames)).flatten()

        def encode_frames(x):
            mean, std = self._moments(x)
            if frame_seeds is not None:
                if std is None:
                    raise ValueError(f"{self.identity} is deterministic: it has no posterior to sample "
                                     f"(use data.latent_sample=mean)")
                noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                                     for s in frame_seeds])
                mean = mean + std * noise.to(mean)
            return (mean - self.shift) * self.scale

        return per_frame(encode_frames, images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return per_frame(lambda z: self._decode(z / self.scale + self.shift).clamp(-1, 1), latents)  # (B, C, [F,] H, W)


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an image function (B, C, H, W) -> (B, C', H', W') to images, or to clips
    (B, C, F, H, W) one frame at a time (an image autoencoder on video, as in Latte)."""
    if x.dim() == 4:
        return fn(x)
    if x.dim() != 5:
        raise ValueError(f"expected images (B, C, H, W) or clips (B, C, F, H, W), got shape {tuple(x.shape)}")
    B, C, F, H, W = x.shape
    y = fn(x.transpose(1, 2).reshape(B * F, C, H, W))                      # (B*F, C', H', W')
    return y.reshape(B, F, *y.shape[1:]).transpose(1, 2)                   # (B, C', F, H', W')


class DiffusersVAE(LatentCodec):
    """diffusers' AutoencoderKL (SD-VAE and relatives) from a local directory or hub name, with
    the scaling (and shift) factor from its config."""

    def __init__(self, name_or_path: str, subfolder: str | None = None):
        super().__init__()
        diffusers = require("diffusers", f"the VAE {name_or_path!r} (data.vae)")
        kwargs = {"subfolder": subfolder} if subfolder else {}
        with loading("VAE (diffusers AutoencoderKL)", name_or_path):
            self.vae = diffusers.AutoencoderKL.from_pretrained(name_or_path, **kwargs).eval().requires_grad_(False)
        config = self.vae.config
        self.in_channels, self.latent_channels = config.in_channels, config.latent_channels
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scale = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)
        self.identity = f"diffusers:{name_or_path}{'/' + subfolder if subfolder else ''}"

    def _moments(self, images):
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    def _decode(self, latents):
        return self.vae.decode(latents).sample


class SmallAutoencoder(LatentCodec):
    """A plain conv autoencoder the project trains itself on its benchmark data (so the latent
    pipeline runs end to end offline): `levels` stride-2 stages down to `latent_channels`, and
    back; trained by MSE plus a small L2 pull on the latents (no KL), its latent std measured after
    training sets `scale`."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, width: int = 32, levels: int = 2):
        super().__init__()
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, width=width, levels=levels)
        self.in_channels, self.latent_channels, self.downsample = in_channels, latent_channels, 2 ** levels
        down, up, c = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()], [], width
        for _ in range(levels):
            down += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.SiLU()]
            up = [nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()] + up
            c *= 2
        self.encoder = nn.Sequential(*down, nn.Conv2d(c, latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, c, 3, padding=1), nn.SiLU(), *up,
                                     nn.Conv2d(width, in_channels, 3, padding=1))
        self.identity = "small-autoencoder:untrained"

    def _moments(self, images):
        return self.encoder(images), None               # deterministic: no posterior spread

    def _decode(self, latents):
        return self.decoder(latents)

    def fit(self, images: torch.Tensor, epochs: int = 5, batch_size: int = 128, lr: float = 2e-3,
            latent_l2: float = 1e-4, seed: int = 0, progress: bool = True) -> dict:
        """Train on in-memory images (N, C, H, W) in [-1, 1]; returns {"mse": last epoch's mean}."""
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            opt = torch.optim.AdamW(self.parameters(), lr=lr)
            gen = torch.Generator().manual_seed(seed)
            bar = tqdm(range(epochs), desc="autoencoder", disable=not progress)
            self.train()
            for _ in bar:
                total, order = 0.0, torch.randperm(len(images), generator=gen)
                for start in range(0, len(images), batch_size):
                    x = images[order[start:start + batch_size]]
                    z = self.encoder(x)
                    mse = (self.decoder(z) - x).pow(2).mean()
                    loss = mse + latent_l2 * z.pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(mse.detach()) * len(x)
                bar.set_postfix(mse=f"{total / len(images):.4f}")
            self.eval()
            with torch.no_grad():
                latents = torch.cat([self.encoder(images[i:i + 512]) for i in range(0, len(images), 512)])
            self.shift, self.scale = float(latents.mean()), float(1.0 / latents.std())
        return {"mse": total / len(images), "scale": self.scale, "shift": self.shift}

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "autoencoder.json").write_text(json.dumps({**self.config, "scale": self.scale,
                                                                "shift": self.shift}, indent=2))
        tmp = directory / "autoencoder.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(directory / "autoencoder.safetensors")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "SmallAutoencoder":
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / "autoencoder.json").read_text())
        model = cls(**{k: meta[k] for k in ("in_channels", "latent_channels", "width", "levels")})
        weights = directory / "autoencoder.safetensors"
        model.load_state_dict(load_file(str(weights)))
        model.scale, model.shift = meta["scale"], meta["shift"]
        model.identity = f"small-autoencoder:{hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}"
        return model.eval().requires_grad_(False)


def build_codec(spec: str, subfolder: str | None = None) -> LatentCodec:
    """A directory with autoencoder.json: this project's SmallAutoencoder; anything else: a
    diffusers AutoencoderKL (local directory or hub name)."""
    if (Path(spec) / "autoencoder.json").is_file():
        return SmallAutoencoder.load(spec)
    return DiffusersVAE(spec, subfolder)
