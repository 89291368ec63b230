"""Latents on disk (nrdm.data.latents): sharded extraction that resumes and splits over
processes to the same files, fingerprints from file metadata, memory-mapped reading that trains
like the in-memory tensor, and the latents of mirrored images."""
import numpy as np
import pytest
import torch
from PIL import Image

from nrdm.data.datasets import ImageFolder, TensorImages
from nrdm.data.latents import LatentShards, extract_latent_shards, source_fingerprint
from nrdm.data.loader import BatchStream


def _data(n=23, size=4):
    gen = torch.Generator().manual_seed(0)
    return TensorImages(torch.rand(n, 1, size, size, generator=gen) * 2 - 1, torch.arange(n) % 3, 3, "toy")


def _encoder(calls=None, fail_after=None):
    """A stand-in codec: latent = 2 * image + index (so rows are told apart), counting its calls."""
    def encode(images, indices):
        if calls is not None:
            calls.append(indices.tolist())
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt("simulated crash")
        return 2 * images + indices.view(-1, 1, 1, 1).float()
    return encode


def test_shards_hold_every_item_in_order_and_read_back(tmp_path):
    data = _data()
    out = extract_latent_shards(data, _encoder(), tmp_path / "set", {"codec": "x2"}, shard_size=5, batch_size=2,
                                progress=False)
    assert len(out) == 23 and out.manifest["num_shards"] == 5 and out.manifest["codec"] == "x2"
    assert (out.channels, out.image_size, out.num_classes) == (1, 4, 3)
    idx = torch.tensor([22, 0, 7, 7, 13])
    latents, labels = out.batch(idx)
    torch.testing.assert_close(latents, 2 * data.images[idx] + idx.view(-1, 1, 1, 1).float())
    assert labels.tolist() == data.labels[idx].tolist()
    assert isinstance(out.latents[0], np.memmap)                    # read from disk, not loaded
    x, y = out[7]
    torch.testing.assert_close(x, latents[2]) and y == labels[2]


def test_an_interrupted_extraction_resumes_at_the_missing_shards(tmp_path):
    data = _data()
    calls = []
    with pytest.raises(KeyboardInterrupt):
        extract_latent_shards(data, _encoder(calls, fail_after=3), tmp_path / "set", {}, shard_size=5, batch_size=5,
                              progress=False)
    assert not (tmp_path / "set" / "manifest.json").exists()                 # incomplete: not a latent set
    assert sorted(p.name for p in (tmp_path / "set").glob("*.latents.npy")) == [
        "shard-00000.latents.npy", "shard-00001.latents.npy", "shard-00002.latents.npy"]
    calls.clear()
    resumed = extract_latent_shards(data, _encoder(calls), tmp_path / "set", {}, shard_size=5, batch_size=5,
                                    progress=False)
    assert calls == [list(range(15, 20)), list(range(20, 23))]               # only the missing shards
    whole = extract_latent_shards(data, _encoder(), tmp_path / "whole", {}, shard_size=5, progress=False)
    all_items = torch.arange(23)
    torch.testing.assert_close(resumed.batch(all_items)[0], whole.batch(all_items)[0])
    calls.clear()
    extract_latent_shards(data, _encoder(calls), tmp_path / "set", {}, shard_size=5, progress=False)
    assert calls == []                                                       # complete: only read


def test_a_damaged_set_is_explained(tmp_path):
    out = extract_latent_shards(_data(), _encoder(), tmp_path / "set", {}, shard_size=5, progress=False)
    (out.directory / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="delete .* and extract again"):
        LatentShards(out.directory)


def _folder(root, n=4):
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return ImageFolder(root, 4)


def test_folder_fingerprint_uses_paths_sizes_and_times_not_pixels(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "imgs")
    monkeypatch.setattr(ImageFolder, "load", lambda self, path: pytest.fail("the fingerprint decoded an image"))
    first = source_fingerprint(folder)
    assert source_fingerprint(ImageFolder(tmp_path / "imgs", 4)) == first       # same files: same key
    path = folder.files[1][0]
    stat = path.stat()
    import os
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))            # touched: a new key
    assert source_fingerprint(ImageFolder(tmp_path / "imgs", 4)) != first


def test_folder_extraction_reads_through_a_dataloader_with_workers(tmp_path):
    folder = _folder(tmp_path / "imgs", 6)
    out = extract_latent_shards(folder, _encoder(), tmp_path / "set", {}, shard_size=4, batch_size=3,
                                num_workers=2, progress=False)
    expect = torch.stack([folder[i][0] for i in range(6)])
    torch.testing.assert_close(out.batch(torch.arange(6))[0], 2 * expect + torch.arange(6).view(-1, 1, 1, 1).float())
    assert out.batch(torch.arange(6))[1].tolist() == [folder[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_mirrored_latents_replace_mirroring_in_the_batch_stream(tmp_path):
    """With stored latents of mirrored images, data.hflip draws those: for an encoder that
    commutes with mirroring this is the stream of the in-memory images mirrored."""
    data = _data(16)
    out = extract_latent_shards(data, lambda x, i: 2 * x, tmp_path / "set", {}, shard_size=5, flip=True,
                                progress=False)
    assert out.has_flipped
    reference = TensorImages(2 * data.images, data.labels, 3, "toy")
    for step in range(3):
        a = BatchStream(out, 8, seed=1, hflip=True).step(step)[0]
        b = BatchStream(reference, 8, seed=1, hflip=True).step(step)[0]
        torch.testing.assert_close(a[0], b[0])
        assert a[1].tolist() == b[1].tolist()
    extract_latent_shards(data, lambda x, i: 2 * x, tmp_path / "noflip", {}, shard_size=5, progress=False)
    assert not LatentShards(tmp_path / "noflip").has_flipped


def test_training_from_memory_mapped_latents_equals_the_in_memory_tensor(tmp_path, tiny_config, monkeypatch):
    from nrdm.training import trainer
    from nrdm.checkpoint import latest_checkpoint, load_checkpoint

    cfg = tiny_config("train.steps=3", "train.ckpt_every=3", "data.hflip=true")
    pixels = trainer.build_dataset(cfg.data)
    shards = extract_latent_shards(pixels, lambda x, i: x, tmp_path / "set", {}, shard_size=500, flip=True,
                                   progress=False)
    weights = []
    for name, dataset in (("memory", pixels), ("mapped", shards)):
        monkeypatch.setattr(trainer, "build_dataset", lambda *args, **kwargs: dataset)
        trainer.train(cfg, tmp_path / name, progress=False)
        weights.append(load_checkpoint(latest_checkpoint(tmp_path / name))["model"])
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)


def test_two_processes_extract_the_same_shards_as_one(tmp_path, torchrun):
    from nrdm.cli import main as cli_main
    from nrdm.models.autoencoder import SmallAutoencoder

    torch.manual_seed(0)
    SmallAutoencoder(1, 2, 8, 1).save(tmp_path / "ae")
    sets = ["--set", f"data.vae={tmp_path / 'ae'}", "--set", "data.latent_channels=2", "--set",
            "data.vae_downsample=2", "--set", "data.image_size=8"]
    common = ["latents", "digits", *sets, "--splits", "train", "--shard-size", "256", "--device", "cpu"]
    import os
    os.environ["NRDM_CACHE"] = str(tmp_path / "one")
    try:
        assert cli_main(common) == 0
    finally:
        del os.environ["NRDM_CACHE"]
    os.environ["NRDM_CACHE"] = str(tmp_path / "two")
    try:
        torchrun(common)
    finally:
        del os.environ["NRDM_CACHE"]
    one, two = (next((tmp_path / d / "latents").iterdir()) for d in ("one", "two"))
    assert one.name == two.name
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir()) and len(files) == 1 + 2 * 8      # 8 shards of 256
    for name in files:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(one / name), np.load(two / name))
