"""Checkpoints: one directory per saved step, written atomically.

    RUN/checkpoints/step-00001000/
        model.safetensors   model weights (fp32)
        ema.safetensors     EMA weights
        state.pt            optimizer, scheduler, grad scaler and divergence-monitor states, step,
                            seed, world size, the run's cost so far and the loss sums since the
                            last log record (read with weights_only=True; the data order and
                            noise are functions of seed and step, so no RNG state is needed)
        config.yaml         the run's configuration
        model.json          the model's resolved build arguments (nrdm.factory.build_model_from_args),
                            so the model rebuilds without the run's data or text model

A checkpoint is first written to `step-XXXXXXXX.tmp/`, flushed to disk, then renamed: a crash at
any point leaves either the complete new checkpoint or none, never a half-written one, and the
previous checkpoints stay untouched. The newest `keep_last` are kept, and with `keep_every` = K
also every checkpoint whose step is a multiple of K (the points of a quality-against-step curve).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")
FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.yaml")
MODEL_ARGS = "model.json"              # written since 2026-12; older checkpoints lack it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def find_checkpoint(run_dir: str | Path, which: str | None = None) -> Path:
    """A run's checkpoint by name: None = the latest, "step-N" / "N" = the one of step N, or a path."""
    run_dir = Path(run_dir)
    if which is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ValueError(f"{run_dir} holds no checkpoint (expected {run_dir}/{CHECKPOINT_DIR}/step-XXXXXXXX/)")
        return found
    if Path(which).is_dir():
        return Path(which)
    digits = which.removeprefix("step-")
    path = run_dir / CHECKPOINT_DIR / f"step-{int(digits):08d}" if digits.isdigit() else None
    if path is None or not path.is_dir():
        names = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
        raise ValueError(f"no checkpoint {which!r} in {run_dir} (it has: {names})")
    return path


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, ema_state: dict, train_state: dict,
                    config_yaml: str, keep_last: int = 2, keep_every: int = 0, model_args: dict | None = None) -> Path:
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)          # left over from a crash
    tmp.mkdir()
    contiguous = lambda state: {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(contiguous(model_state), str(tmp / "model.safetensors"))
    save_file(contiguous(ema_state), str(tmp / "ema.safetensors"))
    torch.save(train_state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    if model_args is not None:
        (tmp / MODEL_ARGS).write_text(json.dumps(model_args, indent=1))
    for name in FILES + ((MODEL_ARGS,) if model_args is not None else ()):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():              # re-saving the same step (e.g. the final step after resume)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        if not (keep_every and int(_NAME.match(old.name).group(1)) % keep_every == 0):
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_model_args(path: str | Path, model_args: dict) -> None:
    """Add model.json to an existing checkpoint (one saved before it existed), atomically."""
    tmp = Path(path) / (MODEL_ARGS + ".tmp")
    tmp.write_text(json.dumps(model_args, indent=1))
    tmp.replace(Path(path) / MODEL_ARGS)


def load_checkpoint(path: str | Path, weights_only: bool = False) -> dict:
    """{'model', 'ema' (state dicts), 'state' (dict, unless weights_only), 'config_yaml', 'model_args'
    (dict, or None for checkpoints saved before model.json existed), 'path'}."""
    path = Path(path)
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                              f"delete it to resume from an earlier checkpoint")
    out = {"path": path, "config_yaml": (path / "config.yaml").read_text(), "model_args": None}
    if (path / MODEL_ARGS).is_file():
        try:
            out["model_args"] = json.loads((path / MODEL_ARGS).read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"checkpoint file {path / MODEL_ARGS} is corrupt ({err}); delete it: it is "
                                  f"resolved again from config.yaml where the run's data is") from err
    for key in ("model", "ema"):
        file = path / f"{key}.safetensors"
        try:
            out[key] = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint file {file} is corrupt or truncated ({err}); delete the "
                                  f"checkpoint directory {path} to resume from an earlier one") from err
    if not weights_only:
        file = path / "state.pt"
        try:
            out["state"] = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as err:  # torch.load raises many types for damaged files
            raise CheckpointError(f"checkpoint file {file} is corrupt or truncated ({type(err).__name__}: {err}); "
                                  f"delete the checkpoint directory {path} to resume from an earlier one") from err
    return out


def load_initial_weights(model: torch.nn.Module, source: str | Path) -> list[str]:
    """train.init_from: copy another run's weights (the EMA of its latest checkpoint, or of the
    checkpoint directory given) into a freshly built model. Every source tensor must land on a
    tensor of the same name and shape; tensors the source lacks keep their initialisation and are
    returned by name (e.g. the extra blocks of a deeper adaLN-Zero or nrdm model: identity at init)."""
    source = Path(source)
    ckpt = source if _NAME.match(source.name) else find_checkpoint(source)
    weights = load_checkpoint(ckpt, weights_only=True)["ema"]
    target = model.state_dict()
    unknown = sorted(set(weights) - set(target))
    mismatched = [f"{k} {tuple(weights[k].shape)} -> {tuple(target[k].shape)}" for k in weights
                  if k in target and weights[k].shape != target[k].shape]
    if unknown or mismatched:
        raise CheckpointError(
            f"train.init_from={source}: its weights do not fit this model ({len(unknown)} tensors it lacks, "
            f"e.g. {unknown[:3]}; {len(mismatched)} of another shape, e.g. {mismatched[:3]}). init_from takes "
            "a run of the same architecture, or a shallower one of the same width (extra blocks start fresh)")
    model.load_state_dict(weights, strict=False)
    return sorted(set(target) - set(weights))
