"""Video datasets. Every dataset yields (clip in [-1, 1] as (C, F, H, W) float32, label int) and
exposes `channels`, `image_size`, `num_frames`, `num_classes`, `len()`.

- moving-digits: the embedded default. Digits of scikit-learn's bundled set bounce around a
  canvas, generated deterministically from a seed (Moving-MNIST-style, offline, in memory).
- video-folder: real data, read when indexed. Three layouts under data.root:
    root/<clip>/<frame images>            SkyTimelapse / Taichi-HD (unlabelled)
    root/<video files>                    mp4 / avi / gif / mov / webm / mkv (unlabelled)
    root/<class>/<video files or clips>   UCF-101 (label = class folder, sorted by name)
  Clips of `frames` frames taken every `stride` frames; every non-overlapping window of each
  video is one item. Frames are center-cropped to a square and resized with Pillow.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from nrdm.data.datasets import IMAGE_EXTENSIONS, TensorImages, load_digits_dataset

VIDEO_EXTENSIONS = {".mp4", ".avi", ".gif", ".mov", ".webm", ".mkv", ".m4v"}
FRAME_EXTENSIONS = IMAGE_EXTENSIONS - VIDEO_EXTENSIONS          # a .gif is a video, never one frame


def moving_digits(num_clips: int = 4096, frames: int = 8, image_size: int = 32, digit_size: int = 16,
                  num_digits: int = 1, speed: float = 2.0, split: str = "train", seed: int = 0) -> TensorImages:
    """Clips of `num_digits` digits (drawn from the digits' train-only or test part) moving in
    straight lines at `speed` pixels per frame and bouncing off the canvas edges; overlapping
    digits combine by maximum. Label = the class of the first digit. Same arguments, same clips.
    """
    if digit_size > image_size:
        raise ValueError(f"digit_size={digit_size} must not exceed image_size={image_size}")
    source = load_digits_dataset(digit_size, "test" if split == "test" else "train-only")
    glyphs = (source.images[:, 0] + 1) / 2                                     # (M, s, s) in [0, 1]
    gen = torch.Generator().manual_seed(seed * 7919 + (1 if split == "test" else 0))
    pick = torch.randint(0, len(glyphs), (num_clips, num_digits), generator=gen)
    room = image_size - digit_size
    start = torch.rand(num_clips, num_digits, 2, generator=gen) * room
    angle = torch.rand(num_clips, num_digits, generator=gen) * 2 * math.pi
    velocity = speed * torch.stack([angle.cos(), angle.sin()], dim=-1)         # (N, K, 2) pixels per frame
    canvas = torch.zeros(num_clips, frames, image_size, image_size)
    clip = torch.arange(num_clips)[:, None, None]
    offset = torch.arange(digit_size)
    for f in range(frames):
        # bouncing = reflecting the unbounded path into [0, room]: a triangle wave of period 2*room
        pos = (start + f * velocity) % (2 * room) if room > 0 else torch.zeros_like(start)
        pos = torch.where(pos > room, 2 * room - pos, pos).round().long()      # (N, K, 2) row, col
        frame = canvas[:, f]                                                   # (N, H, W) view
        for k in range(num_digits):
            rows = (pos[:, k, 0, None] + offset)[:, :, None]                   # (N, s, 1)
            cols = (pos[:, k, 1, None] + offset)[:, None, :]                   # (N, 1, s)
            frame[clip, rows, cols] = torch.maximum(frame[clip, rows, cols], glyphs[pick[:, k]])
    videos = (canvas * 2 - 1)[:, None]                                         # (N, 1, F, H, W)
    return TensorImages(videos, source.labels[pick[:, 0]], 10, "moving-digits")


def _is_clip_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in FRAME_EXTENSIONS for p in path.iterdir())


def _is_source(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS or _is_clip_dir(path)


def scan_video_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """([(video file or frame folder, label)], class names): unlabelled when root holds the
    videos itself, labelled by class subfolder (sorted) otherwise."""
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist; set data.root")
    entries = sorted(root.iterdir())
    direct = [p for p in entries if _is_source(p)]
    if direct:
        return [(p, 0) for p in direct], []
    classes = [p.name for p in entries if p.is_dir()]
    sources = [(p, label) for label, cls in enumerate(classes) for p in sorted((root / cls).iterdir()) if _is_source(p)]
    if not sources:
        raise ValueError(f"{root} holds no videos ({', '.join(sorted(VIDEO_EXTENSIONS))}) or folders of "
                         f"frame images, directly or in class subfolders")
    return sources, classes


class VideoFolder(torch.utils.data.Dataset):
    """Clips from frame folders or video files (see the module docstring for the layouts).

    An unreadable file raises a ValueError naming it; with skip_corrupt=True it is left out with
    a warning when the folder is scanned.
    """

    def __init__(self, root: str | Path, image_size: int, frames: int, stride: int = 1,
                 skip_corrupt: bool = False, num_classes: int | None = None):
        self.root = Path(root)
        if frames < 1 or stride < 1:
            raise ValueError(f"need data.frames >= 1 and data.frame_stride >= 1, got {frames}, {stride}")
        self.image_size, self.num_frames, self.stride, self.channels = image_size, frames, stride, 3
        self.skip_corrupt = skip_corrupt
        self.name = f"video-folder:{self.root}"
        sources, self.classes = scan_video_folder(self.root)
        span = (frames - 1) * stride + 1
        self.items: list[tuple[Path, int, int]] = []                      # (source, label, first frame)
        for path, label in sources:
            try:
                length = self._length(path)
            except ValueError:
                if not skip_corrupt:
                    raise
                warnings.warn(f"skipping unreadable video {path}", stacklevel=2)
                continue
            self.items += [(path, label, s) for s in range(0, length - span + 1, span)]
        if not self.items:
            raise ValueError(f"{self.root} has no video with at least {span} frames "
                             f"(data.frames={frames}, data.frame_stride={stride})")
        self.num_classes = num_classes or len(self.classes)

    # -- reading ------------------------------------------------------------------------------
    def _length(self, path: Path) -> int:
        if path.is_dir():
            return len(self._frame_files(path))
        return len(self._read_video(path))

    @staticmethod
    def _frame_files(path: Path) -> list[Path]:
        return sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)

    @staticmethod
    def _read_video(path: Path) -> np.ndarray:
        """All frames (T, H, W, 3) uint8 of a video file (imageio: pyav or ffmpeg for movies,
        Pillow for GIF)."""
        import imageio.v3 as iio

        try:
            frames = iio.imread(path, index=None)
        except Exception as err:                                        # every backend raises its own type
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]   # not ffmpeg's whole log
            raise ValueError(f"cannot read video {path}: {reason}. Remove or replace the file, or set "
                             f"data.skip_corrupt=true to leave unreadable videos out") from err
        if frames.ndim == 3:                                            # (T, H, W) grayscale
            frames = np.repeat(frames[..., None], 3, axis=-1)
        if frames.ndim != 4 or len(frames) == 0:
            raise ValueError(f"cannot read video {path}: got an array of shape {frames.shape}, expected frames")
        return frames[..., :3]

    def _to_tensor(self, frames: list[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        out = []
        for frame in frames:
            img = Image.fromarray(frame).convert("RGB")
            w, h = img.size
            side = min(w, h)
            img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()))
        clip = torch.stack(out).permute(3, 0, 1, 2)                      # (3, F, S, S)
        return clip.float() / 127.5 - 1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label, first = self.items[index]
        wanted = range(first, first + self.num_frames * self.stride, self.stride)
        if path.is_dir():
            from PIL import Image, UnidentifiedImageError
            files = self._frame_files(path)
            frames = []
            for i in wanted:
                try:
                    with Image.open(files[i]) as img:
                        frames.append(np.asarray(img.convert("RGB")))
                except (UnidentifiedImageError, OSError) as err:
                    raise ValueError(f"cannot read frame {files[i]}: {err}. Remove or replace the file") from err
        else:
            video = self._read_video(path)
            frames = [video[i] for i in wanted]
        return self._to_tensor(frames), label

