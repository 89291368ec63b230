"""Image datasets without torchvision. Every dataset yields (image in [-1, 1] as (C, H, W) float32,
label int) and exposes `channels`, `image_size`, `num_classes`, `len()`.

- digits:  scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), resized; in memory.
- mnist / fashion: standard idx(.gz) files (Debian's `dataset-fashion-mnist` fills
  /usr/share/datasets/fashion-mnist); any directory with the four files works; in memory.
- folder:  ImageNet layout, one subfolder per class, read with Pillow; center crop + resize.

Which dataset a config means, its shape and its facts: nrdm.data.registry.
"""
from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class TensorImages(torch.utils.data.Dataset):
    """In-memory images (N, C, H, W), or video clips (N, C, F, H, W), in [-1, 1] with integer
    labels; `num_frames` is F for clips and 0 for images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str):
        self.images, self.labels, self.num_classes, self.name = images, labels.long(), num_classes, name
        self.channels, self.image_size = images.shape[1], images.shape[-1]
        self.num_frames = images.shape[2] if images.ndim == 5 else 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])

    def batch(self, indices: torch.Tensor):
        """Fast path for in-memory data: one gather instead of per-item calls."""
        return self.images[indices], self.labels[indices]


def _to_unit_range(images_uint: torch.Tensor, max_value: float, image_size: int) -> torch.Tensor:
    x = images_uint.float() / max_value * 2 - 1                         # (N, C, h, w) in [-1, 1]
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1).contiguous()


def load_digits_dataset(image_size: int = 16, split: str = "train") -> TensorImages:
    """scikit-learn's 8x8 digits (values 0..16), bilinearly resized. There is no official split:
    `train` is all 1,797 images; `test` / `train-only` are a fixed 20% / 80% partition."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float()[:, None]          # (1797, 1, 8, 8)
    labels = torch.from_numpy(bunch.target)
    if split in ("test", "train-only"):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(12345))
        cut = len(images) // 5
        keep = order[:cut] if split == "test" else order[cut:]
        images, labels = images[keep], labels[keep]
    elif split != "train":
        raise ValueError(f"unknown split {split!r} for digits; allowed: train, train-only, test")
    return TensorImages(_to_unit_range(images, 16.0, image_size), labels, 10, "digits")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): the MNIST family's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad magic number (expected unsigned-byte idx data)")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if array.size != int(np.prod(shape)):
            raise ValueError(f"header promises shape {shape} but the file holds {array.size} values")
        return array.reshape(shape)
    except (OSError, EOFError, struct.error, ValueError) as err:
        raise ValueError(f"{path} is not a readable idx file: {err}") from err


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{root} has no {stem}(.gz); an MNIST-style directory holds train-images-idx3-ubyte.gz, "
                            f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz")


def load_idx_dataset(root: str | Path, split: str = "train", image_size: int = 28, name: str = "mnist") -> TensorImages:
    root = Path(root)
    if not root.is_dir():
        hint = " (on Debian: apt-get install dataset-fashion-mnist)" if name == "fashion" else ""
        raise FileNotFoundError(f"{name} directory {root} does not exist{hint}; set data.root")
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"unknown split {split!r} for {name}; allowed: train, test")
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split}")
    x = torch.from_numpy(images.copy())[:, None]                       # (N, 1, 28, 28)
    return TensorImages(_to_unit_range(x, 255.0, image_size), torch.from_numpy(labels.astype(np.int64)),
                        int(labels.max()) + 1, name)


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """One image file -> (3, S, S) in [-1, 1]: RGB, center-cropped to a square, bicubic resize.
    An unreadable file is a ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}. Remove or replace the file, "
                         f"or set data.skip_corrupt=true to skip unreadable images") from err
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    img = img.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)   # (3, S, S)
    return x.float() / 127.5 - 1


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>: classes sorted by folder name. Images are read with Pillow when
    indexed, converted to RGB, center-cropped to a square and resized to image_size.

    A file Pillow cannot read raises a ValueError naming it; with skip_corrupt=True it is
    reported once with a warning and replaced by the next readable image.
    """

    def __init__(self, root: str | Path, image_size: int, skip_corrupt: bool = False, num_classes: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; set data.root")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root} has no class subfolders; expected root/<class>/<image files>")
        self.files = [(path, label) for label, cls in enumerate(self.classes)
                      for path in sorted((self.root / cls).rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.files:
            raise ValueError(f"{self.root} has no images with extensions {sorted(IMAGE_EXTENSIONS)}")
        self.image_size, self.channels = image_size, 3
        self.num_classes = num_classes or len(self.classes)
        self.skip_corrupt = skip_corrupt
        self.name = f"folder:{self.root}"
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> torch.Tensor:
        return load_image(path, self.image_size)

    def __getitem__(self, index: int):
        for offset in range(len(self.files)):
            path, label = self.files[(index + offset) % len(self.files)]
            try:
                return self.load(path), label
            except ValueError:
                if not self.skip_corrupt:
                    raise
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path}", stacklevel=2)
        raise ValueError(f"no readable image in {self.root}")
