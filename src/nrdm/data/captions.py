"""Caption datasets for text-to-image: items are (image in [-1, 1], caption id); `caption_table`
lists the distinct captions, so each is encoded once and a batch's text is a table lookup.

- caption files: JSONL lines {"image": PATH, "caption": TEXT} (JourneyDB / COCO style) or CSV
  with `image,caption` columns; image paths relative to the file. Checked when opened: a line
  without a readable image path, an empty caption or a file that is not UTF-8 is an error that
  names the file, the line and what to fix.
- embedded captions: the bundled digits and Fashion-MNIST with varied templates
  ("a handwritten seven", "a photo of an ankle boot"); the class label is kept so a classifier
  can check that samples show what the prompt names.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from nrdm.data.datasets import IMAGE_EXTENSIONS, TensorImages, load_image
from nrdm.data.registry import DATASETS, dataset_spec

def indefinite_article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def class_caption(dataset: str, label: int, template: int = 0) -> str:
    """The caption of class `label` of a dataset with class words (digits, mnist, fashion; the
    registry's spec) with template number `template`."""
    spec = dataset_spec(dataset)
    if not spec.class_words:
        captioned = ", ".join(name for name, s in DATASETS.items() if s.class_words)
        raise ValueError(f"no embedded captions for {dataset!r}; allowed: {captioned}")
    word = spec.class_words[label]
    templates = spec.caption_templates
    return templates[template % len(templates)].format(word=word, digit=label, article=indefinite_article(word))


def _table(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    table = sorted(set(captions))
    where = {c: i for i, c in enumerate(table)}
    return table, torch.tensor([where[c] for c in captions], dtype=torch.long)


class CaptionedImages(TensorImages):
    """In-memory images with one caption each (`captions[i]`) and their class labels
    (`class_labels`); items and batches carry caption ids into `caption_table`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, captions: list[str], num_classes: int, name: str):
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        self.captions = list(captions)
        self.caption_table, caption_ids = _table(self.captions)
        super().__init__(images, caption_ids, num_classes, name)
        self.class_labels = labels.long()


def embed_captions(images: TensorImages, seed: int = 0) -> CaptionedImages:
    """Caption every image of a labelled dataset by its class with a template drawn per image."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randint(0, len(dataset_spec(images.name).caption_templates), (len(images),), generator=gen).tolist()
    captions = [class_caption(images.name, int(y), k) for y, k in zip(images.labels, templates)]
    return CaptionedImages(images.images, images.labels, captions, images.num_classes, images.name + "-captions")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 (byte {err.start}, line {line}): re-save it as UTF-8") from err


class CaptionFile(torch.utils.data.Dataset):
    """(image, caption) pairs listed in a JSONL or CSV file; images read with Pillow when indexed
    (center crop, resize) like ImageFolder."""

    def __init__(self, path: str | Path, image_size: int):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption file {self.path} does not exist")
        self.image_size, self.channels, self.num_classes, self.num_frames = image_size, 3, 0, 0
        self.name = f"captions:{self.path}"
        self.items = self._parse()
        self.caption_table, self.caption_ids = _table(self.captions)

    @property
    def captions(self) -> list[str]:
        return [caption for _, caption in self.items]

    def _parse(self) -> list[tuple[Path, str]]:
        text = _read_text(self.path)
        if self.path.suffix.lower() == ".csv":
            reader = csv.DictReader(io.StringIO(text))
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{self.path}: the CSV header must name the columns image,caption "
                                 f"(found {reader.fieldnames})")
            rows = [(i + 2, row) for i, row in enumerate(reader)]           # line 1 is the header
        else:
            rows = []
            for i, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{i}: not a JSON object ({err.msg}); expected "
                                     f'{{"image": "path.png", "caption": "..."}}') from err
        items = []
        for line, row in rows:
            image, caption = row.get("image"), row.get("caption")
            if not image:
                raise ValueError(f"{self.path}:{line}: no image path")
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{self.path}:{line}: empty caption for {image}; give every image a caption "
                                 f"(guidance uses the empty caption by itself)")
            file = (self.path.parent / image).resolve()
            if not file.is_file():
                raise ValueError(f"{self.path}:{line}: image {image} not found (looked at {file})")
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{self.path}:{line}: {image} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            items.append((file, caption.strip()))
        if not items:
            raise ValueError(f"{self.path} lists no images")
        return items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return load_image(self.items[index][0], self.image_size), int(self.caption_ids[index])
