"""Saving video samples: tensors (N, C, F, H, W) in [-1, 1] -> an animated GIF and an MP4 of the
sample grid (every frame of the animation is a grid of all samples at that frame), plus a PNG
with one row per sample and one column per frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nrdm.utils.images import make_grid, save_grid


def _scaled(grid: np.ndarray, scale: int) -> np.ndarray:
    grid = grid if grid.shape[-1] == 3 else np.repeat(grid, 3, axis=-1)            # (H, W, 3)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid


def save_video(videos: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1,
               fps: int = 8, mp4: bool = True) -> dict[str, Path]:
    """Write <stem>.gif, <stem>.mp4 (H.264 via imageio's ffmpeg/PyAV backend) and
    <stem>-frames.png next to `path` (its suffix is ignored); returns {"gif", "mp4", "frames"}."""
    from PIL import Image

    if videos.ndim != 5:
        raise ValueError(f"expected videos (N, C, F, H, W), got shape {tuple(videos.shape)}")
    path = Path(path)
    stem = path.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    n, c, frames, h, w = videos.shape
    grids = [_scaled(make_grid(videos[:, :, f], nrow), scale) for f in range(frames)]    # F x (H', W', 3)
    out = {}

    gif = stem.with_suffix(".gif")
    tmp = gif.with_name(gif.name + ".tmp")
    images = [Image.fromarray(g) for g in grids]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    tmp.replace(gif)
    out["gif"] = gif

    if mp4:
        import imageio.v3 as iio
        # H.264 encoders want sides divisible by 16 (macro blocks): pad the grid with white
        hh, ww = grids[0].shape[:2]
        padded = np.full((frames, -(-hh // 16) * 16, -(-ww // 16) * 16, 3), 255, dtype=np.uint8)
        padded[:, :hh, :ww] = np.stack(grids)
        movie = stem.with_suffix(".mp4")
        tmp = movie.with_name(movie.stem + ".tmp.mp4")
        iio.imwrite(tmp, padded, fps=fps, codec="libx264")
        tmp.replace(movie)
        out["mp4"] = movie

    strip = videos.transpose(1, 2).reshape(n * frames, c, h, w)                      # row i = sample i's frames
    out["frames"] = save_grid(strip, stem.with_name(stem.name + "-frames.png"), nrow=frames, scale=scale)
    return out
