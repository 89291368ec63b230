"""Experiment tracking beside log.jsonl (`train.loggers`): TensorBoard and Weights & Biases.

Every record the trainer writes to log.jsonl also goes to each tracker:
- numbers become scalars: `train/<key>` (loss, grad_norm, lr, images_per_s, ...), `eval/<metric>`;
- the diagnostics' per-unit lists become histograms (`diagnostics/<key>`: adjoint_norm, the gates'
  alpha/beta statistics, update ratios), one value per gated unit;
- sample grids (PNG) become images at their step.
W&B follows its own environment (WANDB_MODE=offline writes a local run without a network,
WANDB_PROJECT names the project, "nrdm" by default).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nrdm.config import TRACKERS
from nrdm.utils.optional import require

HISTOGRAMS = ("adjoint_norm", "alpha_mean", "beta_mean", "update_ratio")


def _scalars(record: dict) -> dict[str, float]:
    out = {f"train/{k}": float(v) for k, v in record.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    out.update({f"eval/{k}": float(v) for k, v in record.get("eval", {}).items() if isinstance(v, (int, float))})
    return out


def _histograms(record: dict) -> dict[str, np.ndarray]:
    diagnostics = record.get("diagnostics") or {}
    return {f"diagnostics/{k}": np.asarray(diagnostics[k], dtype=np.float64) for k in HISTOGRAMS if k in diagnostics}


def _image(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))                    # (H, W, 3) uint8


class TensorBoardTracker:
    def __init__(self, out: Path, config: dict):
        require("tensorboard", "train.loggers=[tensorboard]")
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, step)
        for key, values in _histograms(record).items():
            self.writer.add_histogram(key, values, step)

    def image(self, path: Path, step: int) -> None:
        self.writer.add_image("samples", _image(path), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out: Path, config: dict):
        self.wandb = require("wandb", "train.loggers=[wandb]")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "nrdm"), name=out.name, dir=str(out),
                                   config=config)

    def log(self, record: dict) -> None:
        data = _scalars(record)
        data.update({k: self.wandb.Histogram(v) for k, v in _histograms(record).items()})
        if data:
            self.run.log(data, step=record.get("step", 0))

    def image(self, path: Path, step: int) -> None:
        self.run.log({"samples": self.wandb.Image(_image(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def build_trackers(names: list[str], out: Path, config: dict) -> list:
    """One tracker per name of train.loggers (checked by nrdm.factory.validate)."""
    kinds = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}
    return [kinds[name](out, config) for name in names]
