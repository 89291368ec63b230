"""Datasets and batching: digits, idx files, image folders (with corrupt files), deterministic
resumable batch order and its split over processes / accumulation steps."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from nrdm.data import BatchStream, ImageFolder, global_batch_indices, load_digits_dataset, load_idx_dataset


def test_digits_dataset():
    data = load_digits_dataset(16)
    assert len(data) == 1797 and data.num_classes == 10 and data.channels == 1
    assert data.images.shape == (1797, 1, 16, 16)
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert set(data.labels.tolist()) == set(range(10))
    test, rest = load_digits_dataset(8, "test"), load_digits_dataset(8, "train-only")
    assert len(test) + len(rest) == 1797
    assert torch.equal(load_digits_dataset(8, "test").images, test.images)     # fixed partition


def write_idx(path, array, gz=True):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_dataset_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=False)
    data = load_idx_dataset(tmp_path, "train", 28, "mnist")
    assert data.images.shape == (5, 1, 28, 28) and data.num_classes == 10
    expected = torch.from_numpy(images).float()[:, None] / 255 * 2 - 1
    torch.testing.assert_close(data.images, expected)
    assert data.labels.tolist() == labels.tolist()

    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_idx_dataset(tmp_path, "test", 28)
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb").write(raw[:-100])      # truncated
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz is not a readable idx file"):
        load_idx_dataset(tmp_path, "train", 28)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_idx_dataset(tmp_path / "missing", "train", 28, "fashion")


def make_folder(root, corrupt=False):
    for cls, color in [("cat", (255, 0, 0)), ("dog", (0, 0, 255))]:
        (root / cls).mkdir(parents=True)
        for i in range(2):
            img = np.zeros((20, 30, 3), dtype=np.uint8)
            img[:, 5:25] = color                       # the centre square after cropping 30 -> 20
            Image.fromarray(img).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")


def test_image_folder_center_crop_and_labels(tmp_path):
    make_folder(tmp_path)
    data = ImageFolder(tmp_path, image_size=8)
    assert data.classes == ["cat", "dog"] and len(data) == 4 and data.num_classes == 2
    x, y = data[0]
    assert x.shape == (3, 8, 8) and y == 0
    torch.testing.assert_close(x[0], torch.ones(8, 8))          # red fills the centre crop
    torch.testing.assert_close(x[2], -torch.ones(8, 8))
    assert data[3][1] == 1


def test_corrupt_image_error_names_file_or_is_skipped(tmp_path):
    make_folder(tmp_path, corrupt=True)
    data = ImageFolder(tmp_path, image_size=8)
    broken = [i for i, (p, _) in enumerate(data.files) if p.name == "broken.jpg"][0]
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg.*data\.skip_corrupt=true"):
        data[broken]
    skipping = ImageFolder(tmp_path, image_size=8, skip_corrupt=True)
    with pytest.warns(UserWarning, match="broken.jpg"):
        x, _ = skipping[broken]
    assert x.shape == (3, 8, 8)


def test_batch_order_is_a_function_of_seed_and_step():
    n, batch = 10, 4
    stream = torch.cat([global_batch_indices(n, batch, seed=3, step=s) for s in range(5)])   # 20 = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(global_batch_indices(n, batch, 3, 2), stream[8:12])               # straddles epochs
    assert not torch.equal(global_batch_indices(n, batch, 4, 0), global_batch_indices(n, batch, 3, 0))


def test_split_over_ranks_and_accumulation_covers_the_global_batch():
    data = load_digits_dataset(8)
    whole = BatchStream(data, 12, seed=0).step(5)[0]
    parts = [mb for rank in range(2) for mb in BatchStream(data, 12, 0, rank, 2, grad_accum=3).step(5)]
    assert len(parts) == 6 and all(len(x) == 2 for x, _ in parts)
    torch.testing.assert_close(torch.cat([x for x, _ in parts]), whole[0])
    assert torch.equal(torch.cat([y for _, y in parts]), whole[1])
    with pytest.raises(ValueError, match="divisible by processes x grad_accum"):
        BatchStream(data, 10, 0, 0, 4)


def test_hflip_is_reproducible():
    data = load_digits_dataset(8)
    a = BatchStream(data, 32, 0, hflip=True).step(3)[0][0]
    b = BatchStream(data, 32, 0, hflip=True).step(3)[0][0]
    plain = BatchStream(data, 32, 0).step(3)[0][0]
    assert torch.equal(a, b) and not torch.equal(a, plain)
    flipped = (a != plain).flatten(1).any(1)
    torch.testing.assert_close(a[flipped], plain[flipped].flip(-1))
