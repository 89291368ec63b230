"""Generating images from a trained backbone: noise -> sampler -> images in [-1, 1]."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nrdm.config import SampleConfig
from nrdm.data.registry import dataset_spec
from nrdm.diffusion import VPSchedule, eps_predictor, sample
from nrdm.models.blocks import unwrap
from nrdm.models.caching import feature_cache
from nrdm.utils.hardware import warn_if_slow_bf16
from nrdm.models.conditions import take


def grid_labels(n: int, num_classes: int) -> torch.Tensor | None:
    """0, 1, ..., K-1, 0, 1, ...: with K columns every column of the grid is one class."""
    return torch.arange(n) % num_classes if num_classes else None


def class_prompts(dataset: str, labels: torch.Tensor) -> list[str]:
    """The first template's caption of each class ("a handwritten seven", ...)."""
    from nrdm.data.captions import class_caption
    return [class_caption(dataset, int(k)) for k in labels]


def grid_classes(cfg, num_classes: int) -> list[int]:
    """The classes a sample grid shows, one per column: sample.grid_classes, else every class of a
    model with up to 16, else 8 spread evenly over the labels (a 1000-class grid stays 8 wide)."""
    if cfg.sample.grid_classes:
        bad = [k for k in cfg.sample.grid_classes if not 0 <= k < num_classes]
        if bad:
            raise ValueError(f"sample.grid_classes {bad} lie outside the model's classes 0..{num_classes - 1}")
        return list(cfg.sample.grid_classes)
    if num_classes <= 16:
        return list(range(num_classes))
    return [k * num_classes // 8 for k in range(8)]


def sample_conditions(model: nn.Module, cfg, n: int, prompts: list[str] | None = None, grid: bool = False):
    """(condition, classes, nrow) for n samples: balanced class labels 0..K-1 for class-conditional
    models (for a grid, the columns of `grid_classes`); for text models the given prompts (cycled),
    or by default prompts naming the classes of captioned digits/mnist/fashion (classes = those
    labels, for accuracy). nrow puts one class (or prompt) per column."""
    if getattr(model, "text_dim", 0):
        from nrdm.factory import text_encoder
        classes = None
        if prompts is None:
            if not cfg.data.captions:
                raise ValueError("this text model was trained on a caption file: pass prompts (--prompt)")
            num_classes = len(dataset_spec(cfg.data.name).class_words)
            classes = grid_labels(n, num_classes)
            prompts = class_prompts(cfg.data.name, torch.arange(num_classes))
        ordered = [prompts[i % len(prompts)] for i in range(n)]
        device = next(model.parameters(), torch.empty(0)).device if hasattr(model, "parameters") else None
        return text_encoder(cfg, device)(ordered), classes, min(len(prompts), n)   # encoder follows the model
    if grid and model.num_classes:
        columns = torch.tensor(grid_classes(cfg, model.num_classes))
        labels = columns[torch.arange(n) % len(columns)]
        return labels, labels, len(columns)
    labels = grid_labels(n, model.num_classes)
    return labels, labels, model.num_classes or None


def noise_seed(*key: int) -> int:
    """A 64-bit generator seed from an integer key (seed, sample index, stream), by numpy's
    SeedSequence: distinct keys give independent streams."""
    return int(np.random.SeedSequence([k % 2 ** 63 for k in key]).generate_state(1, np.uint64)[0])


def initial_noise(shape: tuple, seed: int, start: int, stop: int) -> torch.Tensor:
    """x_T of samples start..stop-1, each from its own generator: sample i is the same whatever
    batch or process draws it."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i, 0)))
                        for i in range(start, stop)])


def chunks(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
    """The (start, stop) sample ranges this process generates: chunk c = [cB, (c+1)B) goes to
    process c mod world_size, so the union over processes is 0..n-1 for any world size."""
    return [(a, min(a + batch_size, n)) for c, a in enumerate(range(0, n, batch_size)) if c % world_size == rank]


def resolve_variance(model: nn.Module, variance: str) -> str:
    """sample.variance with "auto" resolved: learned for a learned-sigma model, else fixed-small."""
    learns_sigma = getattr(unwrap(model), "learn_sigma", False)
    if variance == "auto":
        return "learned" if learns_sigma else "fixed-small"
    if variance == "learned" and not learns_sigma:
        raise ValueError("sample.variance is 'learned' but this model has no variance output (model.learn_sigma: "
                         "false); use auto, fixed-small or fixed-large")
    return variance


def sample_options(s: SampleConfig) -> dict:
    """The sampler and guidance options of sample settings (each sampler takes the ones it
    knows: nrdm.diffusion.sample). `eta` is DDIM's sample.eta for ddim and sample.sde_eta for the
    ancestral and SDE samplers (runs saved before sde_eta existed carry eta: 0.0, DDIM's default,
    which must not silence them)."""
    interval = tuple(s.guidance_interval) if s.guidance_interval else None
    eta = s.eta if s.sampler == "ddim" else s.sde_eta
    return dict(spacing=s.spacing, variance=s.variance, eta=eta, s_churn=s.s_churn, s_tmin=s.s_tmin, s_tmax=s.s_tmax, s_noise=s.s_noise,
                guidance_interval=interval, cfg_rescale=s.cfg_rescale, cache_interval=s.cache_interval,
                precision=s.precision, compile=s.compile)


def generate_chunks(model: nn.Module, schedule: VPSchedule, n: int, labels, settings: SampleConfig,
                    batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = False,
                    clip_x0: float | None = 1.0, decode=None, rank: int = 0, world_size: int = 1, skip=None):
    """Yields (start, samples in [-1, 1] on the CPU) for this process's chunks of n samples (see
    `chunks`), drawn as `settings` (a SampleConfig: sampler, steps, cfg_scale, seed and the
    sampler's options) say. The noise of chunk [a, b) depends only on (settings.seed, a, b): any
    world size gives the same samples, and so does any batch size for the deterministic samplers.
    skip(start, stop) -> True leaves a chunk out (e.g. one already on disk)."""
    s = settings
    options = sample_options(s)
    interval, rescale = options.pop("guidance_interval", None), options.pop("cfg_rescale", 0.0)
    cache_interval = options.pop("cache_interval", 1)
    options["variance"] = resolve_variance(model, options.get("variance", "auto"))
    with_variance = s.sampler == "ddpm" and options["variance"] == "learned"
    precision, compiled = options.pop("precision", "fp32"), options.pop("compile", False)
    warn_if_slow_bf16(device, precision, "sample.precision")
    network = torch.compile(model) if compiled else model                 # the module's attributes pass through
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=dtype)) if dtype else contextlib.nullcontext
    was_training = model.training
    model.eval()
    try:
        for start, stop in chunks(n, batch_size, rank, world_size):
            if skip is not None and skip(start, stop):
                continue
            y = take(labels, start, stop).to(device) if labels is not None else None
            eps_fn = eps_predictor(network, schedule, y, s.cfg_scale, interval, rescale, with_variance)
            gen = torch.Generator().manual_seed(noise_seed(s.seed, start, 1))
            x_T = initial_noise(tuple(model.sample_shape), s.seed, start, stop).to(device)
            with feature_cache(model, cache_interval) as cache, autocast():     # a fresh cache per batch
                stepped = eps_fn if cache is None else (lambda x, t, f=eps_fn: cache.step() or f(x, t))
                x = sample(stepped, x_T, schedule, s.sampler, s.steps, generator=gen, progress=progress,
                           clip_x0=clip_x0, **options)
            x = x.float()
            yield start, (decode(x) if decode is not None else x).clamp(-1, 1).cpu()
    finally:
        model.train(was_training)


def generate(model: nn.Module, schedule: VPSchedule, n: int, labels, settings: SampleConfig,
             batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = False,
             clip_x0: float | None = 1.0, decode=None) -> torch.Tensor:
    """n samples (n, *model.sample_shape), i.e. (n, C, H, W) or (n, C, F, H, W), in [-1, 1], in one
    process, drawn as `settings` say (see generate_chunks). The noise comes from CPU generators,
    so results do not depend on the device (up to floating-point differences between devices).
    clip_x0 = 1 keeps the sampler's data prediction in the pixel range [-1, 1]. Latent models pass
    clip_x0=None and `decode` (latents -> pixels, per batch): see factory.output_kwargs."""
    return torch.cat([x for _, x in generate_chunks(model, schedule, n, labels, settings, batch_size, device, progress,
                                                     clip_x0, decode)])


def save_chunk(samples: torch.Tensor, start: int, parts_dir: Path, png_dir: Path | None = None) -> None:
    """One generated chunk on disk: uint8 rows in parts_dir/<start>.npy (renamed into place when
    complete, so its presence means done) and, for images, <index>.png files in png_dir."""
    from PIL import Image

    from nrdm.utils.images import to_uint8

    pixels = to_uint8(samples)
    if png_dir is not None:
        if samples.ndim != 4:
            raise ValueError("PNG folders hold images; for a video model write an .npz (--npz)")
        png_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(pixels):
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(png_dir / f"{start + i:06d}.png")
    parts_dir.mkdir(parents=True, exist_ok=True)
    tmp = parts_dir / f"{start:08d}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, pixels)
    tmp.replace(parts_dir / f"{start:08d}.npy")


def assemble_npz(parts_dir: Path, n: int, path: Path, labels: torch.Tensor | None = None) -> Path:
    """The chunks in parts_dir -> one ADM-style .npz (arr_0: uint8 samples, arr_1: class labels
    when there are any), streamed through a memory-mapped array so that no process holds the set;
    then parts_dir is removed."""
    import shutil

    starts = sorted(int(p.stem) for p in parts_dir.glob("*.npy"))
    first = np.load(parts_dir / f"{starts[0]:08d}.npy", mmap_mode="r")
    staging = path.with_name(path.name + ".staging.npy")
    table = np.lib.format.open_memmap(staging, mode="w+", dtype=np.uint8, shape=(n, *first.shape[1:]))
    filled = 0
    for start in starts:
        part = np.load(parts_dir / f"{start:08d}.npy")
        table[start:start + len(part)] = part
        filled += len(part)
    if filled != n:
        raise RuntimeError(f"{parts_dir} holds {filled} of {n} samples; run the command again to finish")
    arrays = {"arr_0": table}
    if labels is not None:
        arrays["arr_1"] = labels.numpy()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    del table
    staging.unlink()
    shutil.rmtree(parts_dir)
    return path


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
