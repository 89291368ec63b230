"""The dataset registry: one spec per dataset holds everything the rest of the project may know
about it (how to build it, its sample shape, video or not, its held-out split, its caption
templates, whether the project's domain network can be trained on it). Other modules ask the
registry; none tests a dataset's name.

    from nrdm.data.registry import DatasetSpec, register
    register(DatasetSpec("squares", build=make_squares, shape=lambda data: (1, 4)))
    # now `nrdm train` / `sample` / `eval` accept data.name=squares

`build(data)` gets the DataConfig (its split, image_size, root, ...) and returns the pixel dataset;
`shape(data)` gives (channels, num_classes) without loading images.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nrdm.data.datasets import FASHION_MNIST_DIR, ImageFolder, load_digits_dataset, load_idx_dataset


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    build: Callable                          # DataConfig -> pixel dataset (items (image in [-1, 1], label))
    shape: Callable                          # DataConfig -> (channels, num_classes), without loading images
    video: bool = False                      # items are clips (needs data.frames > 0)
    captioned: bool = False                  # items carry captions of their own (a caption file), not classes
    held_out_split: str | None = None        # the evaluation reference split; None: one set of files
    disjoint_train_split: str = "train"      # training images that exclude the held-out ones
    domain_network: bool = False             # the project's own feature network trains on it (offline FID)
    domain_key: Callable | None = None       # DataConfig -> the domain network's cache key, when more than
                                             # name and size change the data
    class_words: tuple[str, ...] = ()        # one word per class, for embedded captions (data.captions)
    caption_templates: tuple[str, ...] = ()  # str.format over {word}, {digit} (the label), {article}


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


def pixel_config(data, **changes):
    """The pixel view of a DataConfig: the same data without the autoencoder (and any `changes`,
    e.g. captions=False for class labels)."""
    return dataclasses.replace(data, vae=None, **changes)


def check_video(data) -> None:
    video = dataset_spec(data.name).video
    if video and data.frames < 1:
        raise ValueError(f"data.name={data.name} is video: set data.frames (frames per clip, e.g. 8)")
    if not video and data.frames:
        names = ", ".join(name for name, spec in DATASETS.items() if spec.video)
        raise ValueError(f"data.frames={data.frames} needs a video dataset ({names}); "
                         f"data.name={data.name} holds images (set data.frames=0)")


def held_out_split(data) -> str | None:
    """The dataset's held-out split ("test"), or None when it has none (a folder is one set of
    images: its "test" would be the same images again)."""
    return dataset_spec(data.name).held_out_split


def build_dataset(data) -> torch.utils.data.Dataset:
    """data: nrdm.config.DataConfig. Caption data (data.captions, or name=captions) yields
    caption ids into the dataset's `caption_table` instead of class labels. Pixels only: the
    latents of data.vae come from `nrdm.factory.build_dataset`, which wraps this."""
    if data.vae:
        raise ValueError("nrdm.data.build_dataset gives pixels; for data.vae latents use nrdm.factory.build_dataset")
    spec = dataset_spec(data.name)
    check_video(data)
    if data.captions and not spec.class_words:
        captioned = ", ".join(name for name, s in DATASETS.items() if s.class_words)
        raise ValueError(f"data.captions=true captions {captioned} by class; for data.name={data.name} use "
                         f"data.name=captions with a JSONL/CSV caption file")
    dataset = spec.build(data)
    if data.captions:
        from nrdm.data.captions import embed_captions
        dataset = embed_captions(dataset)
    return dataset


def data_shape(data) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) of what the model sees, without loading any images:
    pixels, or VAE latents when data.vae is set."""
    if data.vae:
        if data.image_size % data.vae_downsample:
            raise ValueError(f"data.image_size={data.image_size} must be divisible by data.vae_downsample={data.vae_downsample}")
        _, _, num_classes = data_shape(pixel_config(data))
        return data.latent_channels, data.image_size // data.vae_downsample, num_classes
    spec = dataset_spec(data.name)
    check_video(data)
    channels, num_classes = spec.shape(data)
    return channels, data.image_size, num_classes


def batches(dataset, indices, batch_size: int = 256, num_workers: int = 0):
    """(images, labels) of dataset[indices], batch by batch: one gather per batch for in-memory
    data, a DataLoader with `num_workers` workers for data read from files."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    if hasattr(dataset, "batch"):
        for start in range(0, len(indices), batch_size):
            yield dataset.batch(indices[start:start + batch_size])
        return
    yield from torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices.tolist()), batch_size=batch_size,
                                           num_workers=num_workers, shuffle=False)


def materialise(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(all images, all labels) of a dataset as tensors."""
    parts = list(batches(dataset, torch.arange(len(dataset)), batch_size=max(len(dataset), 1)))
    return torch.cat([x for x, _ in parts]), torch.cat([torch.as_tensor(y) for _, y in parts])


# ---------------------------------------------------------------------------------------------
# the built-in datasets
# ---------------------------------------------------------------------------------------------

def _require_root(data, what: str) -> str:
    if not data.root:
        raise ValueError(f"data.root must point at {what}")
    return data.root


def _idx(data):
    root = data.root or (FASHION_MNIST_DIR if data.name == "fashion" else None)
    if root is None:
        raise ValueError("data.root must point at a directory of MNIST idx(.gz) files")
    return load_idx_dataset(root, data.split, data.image_size, data.name)


def _moving_digits(data):
    from nrdm.data.video import moving_digits
    clips = data.num_clips // 4 if data.split == "test" else data.num_clips
    return moving_digits(clips, data.frames, data.image_size, data.digit_size or data.image_size // 2, data.num_digits,
                         data.speed, data.split)


def _video_folder(data):
    from nrdm.data.video import VideoFolder
    root = _require_root(data, "a video folder (see nrdm.data.video for the layouts)")
    return VideoFolder(root, data.image_size, data.frames, data.frame_stride, data.skip_corrupt, data.num_classes)


def _video_folder_shape(data):
    from nrdm.data.video import scan_video_folder
    if data.num_classes is not None:
        return 3, data.num_classes
    return 3, len(scan_video_folder(Path(data.root or ""))[1])


def _caption_file(data):
    from nrdm.data.captions import CaptionFile
    return CaptionFile(_require_root(data, "a JSONL or CSV caption file (image, caption)"), data.image_size)


def _folder(data):
    return ImageFolder(_require_root(data, "an image folder (root/<class>/<images>)"), data.image_size,
                       data.skip_corrupt, data.num_classes)


def _folder_shape(data):
    if data.num_classes:
        return 3, data.num_classes
    root = Path(data.root or "")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.root (or data.num_classes)")
    return 3, sum(p.is_dir() for p in root.iterdir())


def _ten_classes(data):
    return 1, data.num_classes or 10


def _moving_digits_key(d) -> str:
    """The clips depend on all of these."""
    return (f"{d.name}-{d.image_size}px-f{d.frames}-d{d.digit_size or d.image_size // 2}-v{d.speed:g}"
            f"-k{d.num_digits}-n{d.num_clips}")


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten {word}", "the digit {word}", "a drawing of the number {word}",
                   "a scanned handwritten {digit}", "number {word}, written by hand")
FASHION_WORDS = ("T-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
FASHION_TEMPLATES = ("a photo of {article} {word}", "a grayscale picture of {article} {word}", "{article} {word}",
                     "a product photo of {article} {word}", "a small image showing {article} {word}")

register(DatasetSpec("digits", lambda data: load_digits_dataset(data.image_size, data.split), _ten_classes,
                     held_out_split="test", disjoint_train_split="train-only", domain_network=True,
                     class_words=DIGIT_WORDS, caption_templates=DIGIT_TEMPLATES))
register(DatasetSpec("mnist", _idx, _ten_classes, held_out_split="test", domain_network=True,
                     class_words=DIGIT_WORDS, caption_templates=DIGIT_TEMPLATES))
register(DatasetSpec("fashion", _idx, _ten_classes, held_out_split="test", domain_network=True,
                     class_words=FASHION_WORDS, caption_templates=FASHION_TEMPLATES))
register(DatasetSpec("folder", _folder, _folder_shape))
register(DatasetSpec("captions", _caption_file, lambda data: (3, 0), captioned=True))
register(DatasetSpec("moving-digits", _moving_digits, _ten_classes, video=True, held_out_split="test",
                     domain_network=True, domain_key=_moving_digits_key))
register(DatasetSpec("video-folder", _video_folder, _video_folder_shape, video=True))
