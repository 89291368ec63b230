"""The dataset registry: one spec per dataset holds everything the rest of the project may know
about it (how to build it, its sample shape, video or not, its held-out split, its caption
templates, whether the project's domain network can be trained on it). Other modules ask the
registry; none tests a dataset's name.

    from nrdm.data.registry import DatasetSpec, register
    register(DatasetSpec("squares", build=make_squares, shape=lambda cfg: (1, 4)))
    # now `nrdm train` / `sample` / `eval` accept data.name=squares

`build(cfg)` gets the DataConfig (its split, image_size, root, ...) and returns the pixel dataset;
`shape(cfg)` gives (channels, num_classes) without loading images.
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


def pixel_config(cfg, **changes):
    """The pixel view of a DataConfig: the same data without the autoencoder (and any `changes`,
    e.g. captions=False for class labels)."""
    return dataclasses.replace(cfg, vae=None, **changes)


def check_video(cfg) -> None:
    video = dataset_spec(cfg.name).video
    if video and cfg.frames < 1:
        raise ValueError(f"data.name={cfg.name} is video: set data.frames (frames per clip, e.g. 8)")
    if not video and cfg.frames:
        names = ", ".join(name for name, spec in DATASETS.items() if spec.video)
        raise ValueError(f"data.frames={cfg.frames} needs a video dataset ({names}); "
                         f"data.name={cfg.name} holds images (set data.frames=0)")


def held_out_split(cfg) -> str | None:
    """The dataset's held-out split ("test"), or None when it has none (a folder is one set of
    images: its "test" would be the same images again)."""
    return dataset_spec(cfg.name).held_out_split


def build_dataset(cfg) -> torch.utils.data.Dataset:
    """cfg: nrdm.config.DataConfig. Caption data (data.captions, or name=captions) yields
    caption ids into the dataset's `caption_table` instead of class labels. Pixels only: the
    latents of data.vae come from `nrdm.factory.build_dataset`, which wraps this."""
    if cfg.vae:
        raise ValueError("nrdm.data.build_dataset gives pixels; for data.vae latents use nrdm.factory.build_dataset")
    spec = dataset_spec(cfg.name)
    check_video(cfg)
    if cfg.captions and not spec.class_words:
        captioned = ", ".join(name for name, s in DATASETS.items() if s.class_words)
        raise ValueError(f"data.captions=true captions {captioned} by class; for data.name={cfg.name} use "
                         f"data.name=captions with a JSONL/CSV caption file")
    dataset = spec.build(cfg)
    if cfg.captions:
        from nrdm.data.captions import embed_captions
        dataset = embed_captions(dataset)
    return dataset


def data_shape(cfg) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) of what the model sees, without loading any images:
    pixels, or VAE latents when data.vae is set."""
    if cfg.vae:
        if cfg.image_size % cfg.vae_downsample:
            raise ValueError(f"data.image_size={cfg.image_size} must be divisible by data.vae_downsample={cfg.vae_downsample}")
        _, _, num_classes = data_shape(pixel_config(cfg))
        return cfg.latent_channels, cfg.image_size // cfg.vae_downsample, num_classes
    spec = dataset_spec(cfg.name)
    check_video(cfg)
    channels, num_classes = spec.shape(cfg)
    return channels, cfg.image_size, num_classes


def materialise(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(all images, all labels) of a dataset as tensors: one gather for in-memory data, else item by item."""
    if hasattr(dataset, "batch"):
        return dataset.batch(torch.arange(len(dataset)))
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# ---------------------------------------------------------------------------------------------
# the built-in datasets
# ---------------------------------------------------------------------------------------------

def _require_root(cfg, what: str) -> str:
    if not cfg.root:
        raise ValueError(f"data.root must point at {what}")
    return cfg.root


def _idx(cfg):
    root = cfg.root or (FASHION_MNIST_DIR if cfg.name == "fashion" else None)
    if root is None:
        raise ValueError("data.root must point at a directory of MNIST idx(.gz) files")
    return load_idx_dataset(root, cfg.split, cfg.image_size, cfg.name)


def _moving_digits(cfg):
    from nrdm.data.video import moving_digits
    clips = cfg.num_clips // 4 if cfg.split == "test" else cfg.num_clips
    return moving_digits(clips, cfg.frames, cfg.image_size, cfg.digit_size or cfg.image_size // 2, cfg.num_digits,
                         cfg.speed, cfg.split)


def _video_folder(cfg):
    from nrdm.data.video import VideoFolder
    root = _require_root(cfg, "a video folder (see nrdm.data.video for the layouts)")
    return VideoFolder(root, cfg.image_size, cfg.frames, cfg.frame_stride, cfg.skip_corrupt, cfg.num_classes)


def _video_folder_shape(cfg):
    from nrdm.data.video import scan_video_folder
    if cfg.num_classes is not None:
        return 3, cfg.num_classes
    return 3, len(scan_video_folder(Path(cfg.root or ""))[1])


def _caption_file(cfg):
    from nrdm.data.captions import CaptionFile
    return CaptionFile(_require_root(cfg, "a JSONL or CSV caption file (image, caption)"), cfg.image_size)


def _folder(cfg):
    return ImageFolder(_require_root(cfg, "an image folder (root/<class>/<images>)"), cfg.image_size,
                       cfg.skip_corrupt, cfg.num_classes)


def _folder_shape(cfg):
    if cfg.num_classes:
        return 3, cfg.num_classes
    root = Path(cfg.root or "")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; set data.root (or data.num_classes)")
    return 3, sum(p.is_dir() for p in root.iterdir())


def _ten_classes(cfg):
    return 1, cfg.num_classes or 10


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

register(DatasetSpec("digits", lambda cfg: load_digits_dataset(cfg.image_size, cfg.split), _ten_classes,
                     held_out_split="test", disjoint_train_split="train-only", domain_network=True,
                     class_words=DIGIT_WORDS, caption_templates=DIGIT_TEMPLATES))
register(DatasetSpec("mnist", _idx, _ten_classes, held_out_split="test", domain_network=True,
                     class_words=DIGIT_WORDS, caption_templates=DIGIT_TEMPLATES))
register(DatasetSpec("fashion", _idx, _ten_classes, held_out_split="test", domain_network=True,
                     class_words=FASHION_WORDS, caption_templates=FASHION_TEMPLATES))
register(DatasetSpec("folder", _folder, _folder_shape))
register(DatasetSpec("captions", _caption_file, lambda cfg: (3, 0), captioned=True))
register(DatasetSpec("moving-digits", _moving_digits, _ten_classes, video=True, held_out_split="test",
                     domain_network=True, domain_key=_moving_digits_key))
register(DatasetSpec("video-folder", _video_folder, _video_folder_shape, video=True))
