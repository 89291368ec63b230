"""The dataset registry: a new spec is all train, sample and eval need; every built-in dataset's
facts come from its spec; unknown names list the registered ones."""
import json
import math

import pytest
import torch

from nrdm.cli import main as cli_main
from nrdm.config import DataConfig, load_config
from nrdm.data import DATASETS, DatasetSpec, TensorImages, build_dataset, data_shape, dataset_spec
from nrdm.data.registry import check_video, held_out_split
from nrdm.training import train


def squares(cfg) -> TensorImages:
    """Class 0: a dark square on grey, class 1: a bright one; the test split from another seed."""
    g = torch.Generator().manual_seed(0 if cfg.split == "train" else 1)
    labels = torch.randint(0, 2, (64,), generator=g)
    images = torch.full((64, 1, cfg.image_size, cfg.image_size), 0.0)
    side = cfg.image_size // 2
    for i, y in enumerate(labels.tolist()):
        r, c = torch.randint(0, cfg.image_size - side + 1, (2,), generator=g).tolist()
        images[i, :, r:r + side, c:c + side] = 1.0 if y else -1.0
    return TensorImages(images, labels, 2, "squares")


def test_a_registered_dataset_trains_samples_and_evaluates(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(DATASETS, "squares", DatasetSpec("squares", squares, lambda cfg: (1, 2), held_out_split="test",
                                                         domain_network=True))
    run = tmp_path / "run"
    train(load_config("digits", tiny_overrides + ["data.name=squares", "train.steps=2"]), run, progress=False)
    assert cli_main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    result = tmp_path / "eval.json"
    assert cli_main(["eval", str(run), "--n", "8", "--steps", "2", "--domain-epochs", "1", "--json", str(result)]) == 0
    report = json.loads(result.read_text())
    assert math.isfinite(report["metrics"]["fid"]) and report["protocol"]["split"] == "test"


def test_the_built_in_facts_come_from_the_specs():
    assert data_shape(DataConfig(name="digits", image_size=12)) == (1, 12, 10)
    assert data_shape(DataConfig(name="captions", root="x.jsonl")) == (3, 16, 0)
    assert held_out_split(DataConfig(name="fashion")) == "test" and held_out_split(DataConfig(name="folder")) is None
    assert [name for name, spec in DATASETS.items() if spec.video] == ["moving-digits", "video-folder"]
    assert dataset_spec("fashion").class_words[9] == "ankle boot"
    with pytest.raises(ValueError, match="data.name=moving-digits is video: set data.frames"):
        check_video(DataConfig(name="moving-digits"))
    with pytest.raises(ValueError, match="needs a video dataset \\(moving-digits, video-folder\\)"):
        check_video(DataConfig(name="digits", frames=4))
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; allowed: digits, mnist, fashion, folder"):
        build_dataset(DataConfig(name="imagenet"))
    with pytest.raises(ValueError, match="data.captions=true captions digits, mnist, fashion by class"):
        build_dataset(DataConfig(name="folder", root="x", captions=True))
