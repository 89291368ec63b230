"""Latents on disk: extracted once in shards (streaming, resumable, split over processes), read
memory-mapped by training.

    CACHE/latents/<dataset>-<split>-<size>px-<codec>-<options>-<fingerprint>/
        manifest.json                    written last: its presence means the set is complete
        shard-00000.labels.npy           (n_k,) int64
        shard-00000.flipped.npy          latents of the mirrored images (only with flip=True)
        shard-00000.latents.npy          (n_k, c, [F,] h, w) float32; written last of the shard

Shard k holds items [k*S, (k+1)*S) of the pixel dataset (S = shard_size), whoever wrote it, so
the set does not depend on how many processes extracted it. Under torch.distributed every rank
takes the shards k = rank (mod world size) that are not on disk yet; rank 0 writes the manifest
after a barrier. An interrupted extraction therefore resumes at shard granularity, and no process
ever holds more than one shard of images or latents.

The fingerprint names the source without reading pixels: for file datasets the relative paths,
sizes and modification times of the files; for in-memory datasets (digits, Fashion-MNIST,
generated clips) the bytes of the tensor, which are small.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from nrdm.data.registry import batches

MANIFEST = "manifest.json"
FORMAT = "nrdm-latent-shards-1"


def source_fingerprint(pixels) -> str:
    """sha256 (hex) of what identifies a pixel dataset's content, without decoding any image."""
    digest = hashlib.sha256(f"{type(pixels).__name__}:{len(pixels)}:{getattr(pixels, 'image_size', '')}".encode())
    files = getattr(pixels, "files", None)
    if files is not None:                              # ImageFolder: [(path, label)]; others: [path]
        root = Path(getattr(pixels, "root", "/"))
        for entry in files:
            path, label = entry if isinstance(entry, tuple) else (entry, "")
            path = Path(path)
            stat = path.stat()
            rel = path.relative_to(root) if path.is_relative_to(root) else path
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    elif hasattr(pixels, "images"):
        digest.update(pixels.images.numpy().tobytes())
        digest.update(pixels.labels.numpy().tobytes())
    else:
        raise ValueError(f"cannot fingerprint a {type(pixels).__name__} (it has neither `files` nor `images`)")
    return digest.hexdigest()


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write via a temporary name and rename: a file under its final name is always complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pixel_batches(pixels, lo: int, hi: int, batch_size: int, num_workers: int):
    """(indices, images, labels) of items [lo, hi) in batches: one gather for in-memory data, a
    DataLoader with workers for files."""
    start = lo
    for images, labels in batches(pixels, torch.arange(lo, hi), batch_size, num_workers):
        idx = torch.arange(start, start + len(images))
        start += len(images)
        yield idx, images, labels


def extract_latent_shards(pixels, encode: Callable, directory: str | Path, identity: dict, shard_size: int = 16384,
                          batch_size: int = 64, num_workers: int = 0, flip: bool = False,
                          progress: bool = True) -> "LatentShards":
    """Encode every item of `pixels` into shards under `directory` (see the module docstring) and
    return the set. encode(images, indices) -> latents on the CPU: the caller owns the codec, its
    device and how indices seed posterior noise. identity: what produced the latents (codec,
    options, fingerprint), stored in the manifest. With flip=True the latents of the mirrored
    images are stored beside them (their noise seeded by -1 - index)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        return LatentShards(directory)
    rank, world = _distributed()
    n = len(pixels)
    shards = range((n + shard_size - 1) // shard_size)
    mine = [k for k in shards if k % world == rank and not (directory / f"shard-{k:05d}.latents.npy").is_file()]
    directory.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(min(shard_size, n - k * shard_size) for k in mine), desc=f"latents (rank {rank})",
               disable=not progress, unit="img")
    for k in mine:
        lo, hi = k * shard_size, min((k + 1) * shard_size, n)
        latents, flipped, labels = [], [], []
        for idx, images, y in _pixel_batches(pixels, lo, hi, batch_size, num_workers):
            latents.append(encode(images, idx).float().numpy())
            if flip:
                flipped.append(encode(images.flip(-1), -1 - idx).float().numpy())
            labels.append(torch.as_tensor(y).long().numpy())
            bar.update(len(idx))
        _save_npy(directory / f"shard-{k:05d}.labels.npy", np.concatenate(labels))
        if flip:
            _save_npy(directory / f"shard-{k:05d}.flipped.npy", np.concatenate(flipped))
        _save_npy(directory / f"shard-{k:05d}.latents.npy", np.concatenate(latents))   # last: the shard is done
    bar.close()
    _barrier()
    if rank == 0:
        missing = [k for k in shards if not (directory / f"shard-{k:05d}.latents.npy").is_file()]
        if missing:
            raise RuntimeError(f"latent shards {missing[:5]}... of {directory} are missing after extraction")
        first = np.load(directory / "shard-00000.latents.npy", mmap_mode="r")
        manifest = {"format": FORMAT, **identity, "count": n, "shard_size": shard_size, "num_shards": len(shards),
                    "shape": list(first.shape[1:]), "dtype": str(first.dtype), "flipped": flip,
                    "num_classes": int(getattr(pixels, "num_classes", 0) or 0), "name": f"{pixels.name}-latents"}
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, directory / MANIFEST)
    _barrier()
    return LatentShards(directory)


class LatentShards(torch.utils.data.Dataset):
    """A complete latent set read memory-mapped: the operating system pages in only the rows a
    batch touches, so no process holds the set in memory. Items are (latent, label) like every
    dataset; `batch(indices, flip)` gathers a batch, taking the stored latents of mirrored images
    where `flip` is set (when the set has them)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is missing or unreadable ({err}); delete {self.directory} and extract "
                             f"again (nrdm latents ...)") from err
        m = self.manifest
        if m.get("format") != FORMAT:
            raise ValueError(f"{self.directory} holds latents in format {m.get('format')!r}, expected {FORMAT!r}; "
                             f"delete it and extract again")
        self.shard_size, self.num_classes, self.name = m["shard_size"], m["num_classes"], m["name"]
        self.has_flipped = bool(m["flipped"])
        load = lambda kind: [np.load(self.directory / f"shard-{k:05d}.{kind}.npy", mmap_mode="r")
                             for k in range(m["num_shards"])]
        self.latents, self.labels_by_shard = load("latents"), load("labels")
        self.flipped = load("flipped") if self.has_flipped else None
        if sum(len(s) for s in self.latents) != m["count"]:
            raise ValueError(f"{self.directory}: the shards hold {sum(len(s) for s in self.latents)} latents, the "
                             f"manifest says {m['count']}; delete the directory and extract again")
        shape = m["shape"]
        self.channels, self.image_size = shape[0], shape[-1]
        self.num_frames = shape[1] if len(shape) == 4 else 0

    def __len__(self) -> int:
        return self.manifest["count"]

    def __getitem__(self, index: int):
        images, labels = self.batch(torch.tensor([index]))
        return images[0], int(labels[0])

    def batch(self, indices: torch.Tensor, flip: torch.Tensor | None = None):
        """(latents (B, c, [F,] h, w), labels (B,)) of the given items, in their order."""
        indices = torch.as_tensor(indices).long().numpy()
        flip = np.zeros(len(indices), bool) if flip is None or not self.has_flipped else torch.as_tensor(flip).numpy()
        shard, offset = indices // self.shard_size, indices % self.shard_size
        rows = np.empty((len(indices), *self.manifest["shape"]), np.float32)
        labels = np.empty(len(indices), np.int64)
        for k in np.unique(shard):                     # one fancy-indexed read per shard and source
            here = shard == k
            labels[here] = self.labels_by_shard[k][offset[here]]
            for source, chosen in ((self.latents, here & ~flip), (self.flipped, here & flip)):
                if chosen.any():
                    rows[chosen] = source[k][offset[chosen]]
        return torch.from_numpy(rows), torch.from_numpy(labels)
