"""Generating images from a trained backbone: noise -> sampler -> images in [-1, 1]."""
from __future__ import annotations

import torch
from torch import nn

from nrdm.diffusion import VPSchedule, eps_predictor, sample
from nrdm.models.conditions import take


def grid_labels(n: int, num_classes: int) -> torch.Tensor | None:
    """0, 1, ..., K-1, 0, 1, ...: with K columns every column of the grid is one class."""
    return torch.arange(n) % num_classes if num_classes else None


def class_prompts(dataset: str, labels: torch.Tensor) -> list[str]:
    """The first template's caption of each class ("a handwritten seven", ...)."""
    from nrdm.data.captions import class_caption
    return [class_caption(dataset, int(k)) for k in labels]


def sample_conditions(model: nn.Module, cfg, n: int, prompts: list[str] | None = None):
    """(condition, classes, nrow) for n samples: balanced class labels for class-conditional
    models; for text models the given prompts (cycled), or by default prompts naming the classes
    of captioned digits/mnist/fashion (classes = those labels, for accuracy). nrow puts one
    class (or prompt) per column."""
    if getattr(model, "text_dim", 0):
        from nrdm.factory import text_encoder
        classes = None
        if prompts is None:
            if not cfg.data.captions:
                raise ValueError("this text model was trained on a caption file: pass prompts (--prompt)")
            classes = grid_labels(n, 10)
            prompts = class_prompts(cfg.data.name, torch.arange(10))
        ordered = [prompts[i % len(prompts)] for i in range(n)]
        return text_encoder(cfg)(ordered), classes, min(len(prompts), n)
    labels = grid_labels(n, model.num_classes)
    return labels, labels, model.num_classes or None


@torch.no_grad()
def generate(model: nn.Module, schedule: VPSchedule, n: int, labels: torch.Tensor | None = None,
             sampler: str = "dpm++2m", steps: int = 50, cfg_scale: float = 1.0, eta: float = 0.0, seed: int = 0,
             batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = False,
             clip_x0: float | None = 1.0, decode=None) -> torch.Tensor:
    """n samples (n, *model.sample_shape), i.e. (n, C, H, W) or (n, C, F, H, W), in [-1, 1]. The
    initial noise and the samplers' noise come from CPU generators seeded by `seed`, so results do
    not depend on the device or batch size (up to floating-point differences between devices).
    clip_x0 = 1 keeps the sampler's data prediction in the pixel range [-1, 1]. Latent models pass
    clip_x0=None and `decode` (latents -> pixels, per batch): see factory.output_kwargs."""
    was_training = model.training
    model.eval()
    x_T = torch.randn((n, *model.sample_shape), generator=torch.Generator().manual_seed(seed))
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        y = take(labels, start, stop).to(device) if labels is not None else None
        eps_fn = eps_predictor(model, schedule, y, cfg_scale)
        extra = {"eta": eta} if sampler == "ddim" else {}
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
        x = sample(eps_fn, x_T[start:stop].to(device), schedule, sampler, steps, generator=gen,
                   progress=progress, clip_x0=clip_x0, **extra)
        out.append((decode(x) if decode is not None else x).clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out)


def save_samples(samples: torch.Tensor, path, nrow: int | None = None, scale: int | None = None,
                 fps: int = 8) -> list:
    """Images (N, C, H, W) -> a PNG grid at `path`; videos (N, C, F, H, W) -> GIF + MP4 of the
    grid and a PNG of frames (one row per sample) next to it. Returns the written paths."""
    from nrdm.utils.images import save_grid
    from nrdm.utils.video import save_video

    scale = scale or max(1, 64 // samples.shape[-1])
    if samples.ndim == 5:
        return list(save_video(samples, path, nrow=nrow, scale=scale, fps=fps).values())
    return [save_grid(samples, path, nrow=nrow, scale=scale)]
