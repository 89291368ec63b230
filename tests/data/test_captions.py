"""Caption datasets: embedded captions name the class; caption files (JSONL, CSV) load, and bad
files (missing image, empty caption, bad encoding, bad JSON) give errors naming file and line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nrdm.data.captions import CaptionFile, class_caption, embed_captions
from nrdm.data.datasets import load_digits_dataset


def test_embedded_captions_name_the_class():
    data = embed_captions(load_digits_dataset(8))
    assert len(set(data.captions)) > 10                          # varied templates
    from nrdm.data.registry import DIGIT_WORDS
    for caption, label in zip(data.captions[:50], data.class_labels[:50]):
        assert DIGIT_WORDS[label] in caption or str(int(label)) in caption
    images, ids = data.batch(torch.tensor([0, 5]))
    assert [data.caption_table[i] for i in ids] == [data.captions[0], data.captions[5]]
    assert data.caption_table[data[0][1]] == data.captions[0] and torch.equal(images, data.images[[0, 5]])
    assert class_caption("fashion", 9) == "a photo of an ankle boot"
    assert class_caption("digits", 7) == "a handwritten seven"
    assert embed_captions(load_digits_dataset(8)).captions == data.captions      # deterministic


def _image(path, value=128):
    Image.fromarray(np.full((10, 14, 3), value, dtype=np.uint8)).save(path)


def test_jsonl_and_csv_caption_files(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.png", 0)
    _image(tmp_path / "img" / "b.jpg", 255)
    lines = [{"image": "img/a.png", "caption": "a black square"}, {"image": "img/b.jpg", "caption": " a white one "}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = CaptionFile(tmp_path / "c.jsonl", image_size=8)
    assert len(data) == 2 and data.captions == ["a black square", "a white one"]
    image, caption_id = data[1]
    assert image.shape == (3, 8, 8) and data.caption_table[caption_id] == "a white one" and image.min() > 0.99
    (tmp_path / "c.csv").write_text('image,caption\nimg/a.png,"a black square, centred"\n')
    assert CaptionFile(tmp_path / "c.csv", 8).captions == ["a black square, centred"]


@pytest.mark.parametrize("content, message", [
    ('{"image": "missing.png", "caption": "x"}\n', r"c.jsonl:1: image missing.png not found"),
    ('{"image": "a.png", "caption": "fine"}\n{"image": "a.png", "caption": "  "}\n', r"c.jsonl:2: empty caption"),
    ('{"image": "a.png", "caption": "fine"}\nnot json\n', r"c.jsonl:2: not a JSON object"),
    (b'{"image": "a.png", "caption": "caf\xe9"}\n', r"c.jsonl is not UTF-8 \(byte 34, line 1\)"),
])
def test_bad_caption_files_name_file_and_line(tmp_path, content, message):
    _image(tmp_path / "a.png")
    path = tmp_path / "c.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        CaptionFile(path, 8)


def test_csv_needs_its_columns(tmp_path):
    (tmp_path / "c.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ValueError, match="must name the columns image,caption"):
        CaptionFile(tmp_path / "c.csv", 8)
