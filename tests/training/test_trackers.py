"""train.loggers: TensorBoard event files and an offline W&B run hold what log.jsonl holds; a
missing package is an error naming the extra that installs it."""
import builtins

import pytest

from nrdm.cli import main as cli_main
from nrdm.training import train

SETTINGS = ["train.steps=4", "train.log_every=2", "train.diagnostics_every=2"]


def test_tensorboard_holds_scalars_histograms_and_samples(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(tiny_config(*SETTINGS, "train.loggers=[tensorboard]"), tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4] and all(e.value > 0 for e in loss)
    assert {"train/lr", "train/grad_norm", "train/images_per_s"} <= set(tags["scalars"])
    assert "diagnostics/adjoint_norm" in tags["histograms"]
    assert [e.step for e in events.Images("samples")] == [4]


def test_wandb_offline_run(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config(*SETTINGS, "train.loggers=[wandb]"), tmp_path / "run", progress=False)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_missing_tracker_package_names_the_extra(tiny_config, tmp_path, tiny_overrides, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.delitem(__import__("sys").modules, "tensorboard", raising=False)
    sets = [a for o in tiny_overrides + ["train.loggers=[tensorboard]"] for a in ("--set", o)]
    assert cli_main(["train", "digits", "--out", str(tmp_path / "run"), "--no-progress", *sets]) == 2
    assert 'pip install -e ".[tracking]"' in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown train.loggers"):
        train(tiny_config("train.loggers=[mlflow]"), tmp_path / "x", progress=False)
