"""Image files: tensors in [-1, 1] -> PNG grids (Pillow); batches read back from an ADM-style
.npz or a folder of image files without loading the whole set."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8; clips (N, C, F, H, W) -> (N, F, H, W, C), the
    layout of ADM's sample batches."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(1, -1).cpu().numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """Inverse of to_uint8: (N, [F,] H, W, C) uint8 -> (N, C, [F,] H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(pixels)).movedim(-1, 1).float() / 127.5 - 1     # a copy: read-only inputs


def npz_member_batches(path: str | Path, key: str = "arr_0", batch_size: int = 256):
    """Yields consecutive row blocks of one array of an .npz file, read from the archive in
    pieces (an ADM reference batch is ~2 GB; it never has to fit in memory)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        if f"{key}.npy" not in archive.namelist():
            raise ValueError(f"{path} has no array {key!r} (it holds {', '.join(archive.namelist())})")
        with archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if fortran:
                raise ValueError(f"{path}:{key} is stored in Fortran order; save it C-contiguous")
            row = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                yield np.frombuffer(f.read(row * count), dtype=dtype).reshape(count, *shape[1:])


def image_batches(path: str | Path, batch_size: int = 256):
    """uint8 (B, H, W, C) batches of a sample set: arr_0 of an .npz (ADM / `nrdm sample --npz`),
    or the image files of a folder in name order."""
    from PIL import Image

    path = Path(path)
    if path.suffix == ".npz":
        yield from npz_member_batches(path, "arr_0", batch_size)
        return
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise ValueError(f"{path} holds no image files (.png, .jpg, ...) and is not an .npz")
    for start in range(0, len(files), batch_size):
        arrays = []
        for file in files[start:start + batch_size]:
            with Image.open(file) as img:
                a = np.asarray(img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode))
            arrays.append(a[..., None] if a.ndim == 2 else a)
        yield np.stack(arrays)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows*H', cols*W', C) uint8 array, row-major."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"can only draw 1- or 3-channel images, got {c} channels (decode latents first)")
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i, img in enumerate(to_uint8(images)):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid; `scale` enlarges small images (nearest neighbour) for viewing."""
    from PIL import Image

    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path
