"""Image proxy of the depth study: a narrow flow-shaped (DiT-like) or U-shaped (U-ViT-like)
transformer on digits or Fashion-MNIST, or the preset's own model (`backbone="preset"`: e.g. the
conv U-Net of `digits` or the transformer of `digits-flow`, with only its variant and depth
changed), trained by the project's own trainer, with the sample quality (domain-network FID and
class accuracy) measured during training.

Each cell is an ordinary training run in `<grid>/cells/<key>/` (config.yaml, log.jsonl,
checkpoints, a sample grid), so any cell can be inspected, sampled or evaluated with the CLI; a
cell interrupted mid-run resumes from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from nrdm.config import ModelConfig, load_config
from nrdm.lab.grid import DIVERGENCE_FACTOR


# The study's evaluation sampler, fixed here rather than read from the preset, so that every cell
# of a grid, including cells run long before, is scored alike when a preset's sampling default
# changes. The guidance scale stays the preset's (1.5 on digits, 2 on Fashion-MNIST).
STUDY_SAMPLING = dict(sampler="dpm++2m", spacing="uniform", guidance_interval=None, cfg_rescale=0.0,
                      cache_interval=1, precision="fp32", compile=False)
STUDY_SAMPLE_STEPS = {"preset": 25, "proxy": 20}     # preset cells; narrow proxy transformers
# The study's loss: the plain eps-MSE with uniformly drawn steps, whatever a preset's recipe, so that the
# residual forms stay compared under the loss the study ran with when a preset adopts a faster one
# (docs/training-options.md). Unlike the sampler these are the user's keys: `--set` measures an option.
STUDY_LOSS = ("diffusion.min_snr_gamma=0", "diffusion.timestep_sampling=uniform")
# a cell checkpoints this many times per evaluation interval, so that a study process killed (a session's
# end, a preempted node) loses at most a sixteenth of a 4-evaluation cell rather than a quarter
CHECKPOINTS_PER_EVALUATION = 4

# config keys an image cell sets from its own fields and options. A proxy cell builds its whole model
# from --width/--depth/--heads/--patch-size/--variants; a preset cell keeps the preset's model and sets
# only its depth and residual form, so its other model keys (first_branch, gate_source, ...) are the user's.
LAB_KEYS = ("diffusion.gamma", "diffusion.penalty_units", "train.steps", "train.batch_size", "train.lr",
            "train.seed", "train.warmup_steps", "train.precision", "train.log_every", "train.eval_every",
            "train.eval_n", "train.ckpt_every", "train.keep_last", "train.diagnostics_every",
            "train.divergence_factor", "sample.n", "sample.steps") + tuple(f"sample.{key}" for key in STUDY_SAMPLING)
LAB_MODEL_KEYS = {"preset": ("model.depth", "model.variant"), "proxy": ("model.",)}


def _is_lab_key(key: str, backbone: str) -> bool:
    """Whether the lab sets `key` itself in a cell of `backbone` (entries ending in "." cover a whole
    section)."""
    owned = LAB_KEYS + LAB_MODEL_KEYS["preset" if backbone == "preset" else "proxy"]
    return any(key.startswith(k) if k.endswith(".") else key == k for k in owned)


@dataclass(frozen=True)
class ImageCell:
    """One image run: a `backbone` of `depth` transformer blocks (two gated units each) of
    `variant` at fixed width, trained `steps` steps from the `preset`'s data and diffusion
    settings, with penalty weight `gamma`. backbone "preset" keeps the preset's whole model and
    training recipe (lr schedule, warm-up, EMA, guidance scale) and changes only its variant and depth
    (model.depth: blocks of a transformer, units per level of a U-Net); width, heads and
    patch_size are then unused. Every cell trains the plain loss (STUDY_LOSS) unless `overrides`
    set an option."""

    preset: str
    backbone: str
    variant: str
    depth: int
    gamma: float
    seed: int
    width: int = 64
    heads: int = 4
    patch_size: int = 4
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    penalty_units: int = 1
    overrides: tuple[str, ...] = ()      # KEY=VALUE changes to the preset (as `nrdm train --set`)

    @property
    def setting(self) -> str:
        return self.preset if self.backbone == "preset" else f"{self.preset}-{self.backbone}"

    @property
    def key(self) -> str:
        shape = "" if self.backbone == "preset" else f"|w{self.width}|p{self.patch_size}"
        key = f"{self.setting}|{self.variant}|d{self.depth}|g{self.gamma:g}|s{self.seed}{shape}|n{self.steps}"
        if self.overrides:
            key += "|" + hashlib.sha256("\n".join(self.overrides).encode()).hexdigest()[:8]
        return key

    def config(self, eval_points: int = 3, eval_n: int = 250, snapshots: int = 3):
        taken = [o for o in self.overrides if _is_lab_key(o.split("=")[0].strip(), self.backbone)]
        if taken:
            model = ("model.depth and model.variant from --depths/--variants" if self.backbone == "preset" else
                     "the model from --width/--depth/--heads/--patch-size/--variants")
            raise ValueError(f"{taken}: the lab sets these keys itself ({model}, training from --steps/--batch-size/"
                             f"--lr/--seeds/--gammas, the evaluation sampler from the study protocol)")
        cfg = load_config(self.preset, [*STUDY_LOSS, *self.overrides])     # later overrides win
        if self.backbone == "preset":
            cfg.model = dataclasses.replace(cfg.model, depth=self.depth, variant=self.variant)
            recipe = dict(lr=cfg.train.lr, batch_size=cfg.train.batch_size)
        else:
            cfg.model = ModelConfig(backbone=self.backbone, width=self.width, depth=self.depth, heads=self.heads,
                                    patch_size=self.patch_size, mlp_ratio=2.0, variant=self.variant)
            recipe = dict(lr=self.lr, batch_size=self.batch_size)
        cfg.diffusion = dataclasses.replace(cfg.diffusion, gamma=self.gamma, penalty_units=self.penalty_units)
        every = max(1, self.steps // eval_points)
        cfg.train = dataclasses.replace(
            cfg.train, steps=self.steps, seed=self.seed, **recipe,
            warmup_steps=min(cfg.train.warmup_steps, self.steps // 4), precision="fp32",
            log_every=every, eval_every=every, eval_n=eval_n, keep_last=1,
            ckpt_every=max(1, every // CHECKPOINTS_PER_EVALUATION),
            diagnostics_every=max(1, self.steps // snapshots), divergence_factor=DIVERGENCE_FACTOR)
        steps = STUDY_SAMPLE_STEPS["preset" if self.backbone == "preset" else "proxy"]
        cfg.sample = dataclasses.replace(cfg.sample, n=50, steps=steps, **STUDY_SAMPLING)
        return cfg

    def run(self, cells_dir: str | Path, eval_points: int = 3, eval_n: int = 250, snapshots: int = 3,
            progress: bool = False) -> dict:
        from nrdm.training import TrainingStopped, train

        start = time.time()
        cfg = self.config(eval_points, eval_n, snapshots)
        out = Path(cells_dir) / self.key.replace("|", "_")
        record = {**asdict(self), "key": self.key, "setting": self.setting, "metric": "FID (domain network)",
                  "run_dir": str(out), "diverged": False, "diverged_step": None}
        try:
            train(cfg, out, resume=True, progress=progress)
        except TrainingStopped as stop:
            record.update(diverged=True, diverged_step=stop.step, diverged_reason=str(stop))
        record.update(_read_log(out / "log.jsonl"))
        if record["diverged"]:          # the curve keeps the evaluations before; no final quality
            record.pop("quality", None), record.pop("eval", None)
        else:
            record["gates"] = _gates(cfg, out)
        record["quality_floor"] = _image_floor(cfg.data, eval_n)
        # what the cell cost over all its invocations, from its log; else (a run resumed from an older
        # log) only this invocation's wall-clock
        record["seconds"] = record.pop("wall_seconds", None) or time.time() - start
        return record


def _read_log(path: Path) -> dict:
    """Curves from a run's JSONL log: loss at every logged step, FID, class accuracy and the
    training seconds so far at every evaluation, adjoint norms at every diagnostics step; and the
    run's cost (wall_seconds, cpu_seconds: evaluations included) where its last record states it."""
    losses, curve, sensitivity, last_eval = {}, [], {}, None
    seconds, last_step = 0.0, 0              # training wall-clock, summed from the logged windows
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for rec in records:
        if "eval" in rec:
            last_eval = rec["eval"]
            curve.append({"step": rec["step"], "quality": rec["eval"]["fid"], "class_accuracy":
                          rec["eval"].get("class_accuracy"), "seconds": seconds})
        elif "loss" in rec and not rec.get("skipped") and not rec.get("diverged") and "event" not in rec:
            losses[rec["step"]] = rec["loss"]
            if rec.get("steps_per_s"):
                seconds += (rec["step"] - last_step) / rec["steps_per_s"]
                last_step = rec["step"]
            if "diagnostics" in rec:
                sensitivity[str(rec["step"])] = rec["diagnostics"]["adjoint_norm"]
    for point in curve:
        point["loss"] = losses.get(point["step"])
    out = {"curve": curve, "sensitivity": sensitivity}
    out.update({k: records[-1][k] for k in ("wall_seconds", "cpu_seconds") if records and k in records[-1]})
    if losses:
        out["final_loss"] = losses[max(losses)]
    if last_eval is not None:
        out["quality"], out["eval"] = last_eval["fid"], last_eval
    return out


def _image_floor(data_cfg, n: int) -> float:
    """Domain-network FID of n real training images against the held-out reference."""
    return _floor_cached(yaml.safe_dump(dataclasses.asdict(data_cfg)), n)


@functools.lru_cache(maxsize=None)
def _floor_cached(data_yaml: str, n: int) -> float:
    from nrdm.config import DataConfig
    from nrdm.metrics.evaluate import real_floor
    return real_floor(DataConfig(**yaml.safe_load(data_yaml)), n)["fid"]


def _gates(cfg, out: Path) -> dict:
    from nrdm.factory import build_dataset
    from nrdm.factory import load_run
    from nrdm.models.tracing import gate_profile

    _, model, _, _ = load_run(out)
    images, labels = build_dataset(cfg.data).batch(torch.arange(64))
    return gate_profile(model, images, labels if model.num_classes else None)
