"""The training loop: one code path from one CPU process to torchrun on many GPUs.

Design (after nanoGPT's train.py and EDM2's loop):
- Randomness and data order are pure functions of (seed, step): every step re-seeds the noise
  generator (shared by all ranks, drawing the whole global batch) and the per-rank torch RNG
  (dropout), and `BatchStream` derives the batch from (seed, step). So a checkpoint only needs
  weights, EMA, optimizer, scheduler and the step, and an interrupted-and-resumed run repeats an
  uninterrupted one exactly.
- A step whose gradient norm (or, under fp16 loss scaling, whose loss) is not finite is skipped
  and logged; `max_bad_steps` consecutive such steps stop training with a clear message. With
  `divergence_factor` > 0, a finite loss above that multiple of its running minimum stops it too.
- Rank 0 logs JSONL (step, loss, grad norm, lr, steps/s, images/s, diagnostics, the run's cost so far) and stdout,
  writes checkpoints (atomically) and sample grids from the EMA weights with fixed seeds.
The trainer never looks at the residual variant: it sees a backbone and a loss.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import shutil
import time
import warnings
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nrdm.config import Config, from_dict
from nrdm.data import BatchStream
from nrdm.data.registry import data_shape
from nrdm.diffusion import NoiseDraws, diffusion_loss
from nrdm.factory import (build_dataset, build_loss_config, build_model_from_config, build_schedule, output_kwargs,
                          training_condition, validate)
from nrdm.models import count_parameters, no_weight_decay_names
from nrdm.sampling import generate, sample_conditions, save_samples
from nrdm.checkpoint import latest_checkpoint, load_checkpoint, load_initial_weights, save_checkpoint
from nrdm.training.divergence import DivergenceMonitor
from nrdm.training.distributed import DistEnv, all_reduce_mean, barrier, init_distributed
from nrdm.training.ema import EMA
from nrdm.training.trackers import build_trackers
from nrdm.utils.hardware import warn_if_slow_bf16

# config keys that may change when a run is resumed: the budget, logging and sampling, and what
# changes how, not what, is computed (compilation, activation recomputation, the device, where
# the data lives, loader workers)
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_last", "train.keep_every",
                     "train.sample_every",
                     "train.diagnostics_every", "train.eval_every", "train.eval_n", "train.max_bad_steps",
                     "train.divergence_factor", "train.loggers", "train.compile", "train.channels_last", "train.device",
                     "model.grad_checkpointing",
                     "data.num_workers", "data.root", "sample.")


class TrainingStopped(RuntimeError):
    """Training cannot go on (repeated non-finite steps, or divergence); `step` is where it stopped."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume_config(saved_yaml: str, cfg: Config) -> None:
    import yaml
    saved = _flat(from_dict(yaml.safe_load(saved_yaml)).to_dict())
    now = _flat(cfg.to_dict())
    diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k) and not any(k == c or (c.endswith(".") and k.startswith(c))
                                                       for c in RESUMABLE_CHANGES)]
    if diffs:
        raise ValueError("cannot resume: the configuration differs from the checkpoint's in "
                         + "; ".join(diffs) + ". Resume with the same settings (only "
                         + ", ".join(RESUMABLE_CHANGES) + " may change) or start a new --out directory")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only; never on biases, norms, embeddings'
    null row... or DiMR's time-dependent parameters."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class JsonlLog:
    """log.jsonl (one JSON record per line), each record also sent to the trackers of train.loggers."""

    def __init__(self, path: Path, enabled: bool, trackers: list = ()):
        self.path, self.enabled, self.trackers = path, enabled, list(trackers)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resumed run restarts from)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def has(self, step: int, key: str) -> bool:
        """Whether a record of `step` carries `key` (e.g. an evaluation)."""
        if not (self.enabled and self.path.exists()):
            return False
        records = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
        return any(record.get("step") == step and key in record for record in records)

    def last(self) -> dict | None:
        """The last record, or None."""
        if not (self.enabled and self.path.exists()):
            return None
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for tracker in self.trackers:
                tracker.log(record)

    def images(self, paths: list[Path], step: int) -> None:
        for tracker in self.trackers:
            for path in paths:
                if path.suffix == ".png":
                    tracker.image(path, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def lr_factor(tc, step: int) -> float:
    """lr(step) / train.lr: a linear warm-up over warmup_steps, then constant, or a cosine decay
    from lr at the end of the warm-up to min_lr at train.steps:
        lr(s) = min_lr + (lr - min_lr) (1 + cos(pi (s - w) / (S - w))) / 2."""
    warmup = max(tc.warmup_steps, 1)
    if step + 1 < warmup or tc.lr_schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    progress = min(1.0, (step + 1 - warmup) / max(tc.steps - warmup, 1))
    floor = tc.min_lr / tc.lr if tc.lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2 ** 63)


def train(cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True,
          env: DistEnv | None = None) -> dict:
    """Train per `cfg`, writing to out_dir; returns a summary dict. See the module docstring.
    A run that fails before it has written anything but its config (bad data, a crash in the
    first step) removes the directory it created, so a retry needs no cleanup."""
    out = Path(out_dir)
    fresh = not out.exists()
    try:
        return _train(cfg, out, resume, progress, env)
    except BaseException:
        if fresh and _holds_only_a_config(out):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _holds_only_a_config(out: Path) -> bool:
    """The run directory has its config.yaml and at most the log's start record: nothing to keep."""
    if not out.is_dir() or latest_checkpoint(out) is not None:
        return False
    names = {p.name for p in out.iterdir()}
    log = out / "log.jsonl"
    return names <= {"config.yaml", "log.jsonl"} and (not log.exists() or len(log.read_text().splitlines()) <= 1)


class StatsWindow:
    """Running sums of the logged quantities since the last log record; time spent on
    checkpoints, samples and evaluation (`paused`) is not training time. A checkpoint between two
    log records stores the sums, so the next record of a resumed run averages the same steps as an
    uninterrupted run's (its speed, steps_per_s, counts only this process's steps)."""

    def __init__(self):
        self.sums, self.n, self.steps, self.t0 = torch.zeros(3, dtype=torch.float64), 0, 0, time.perf_counter()

    def state_dict(self) -> dict:
        return {"sums": self.sums.tolist(), "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.n = torch.tensor(state["sums"], dtype=torch.float64), int(state["n"])

    def add(self, step_loss: torch.Tensor | None) -> None:
        """step_loss: (loss, mse, penalty) of a taken step, on the host; None for a skipped step."""
        self.steps += 1
        if step_loss is not None:
            self.sums += step_loss
            self.n += 1

    def record(self, done: int, grad_norm, lr: float, batch_size: int) -> dict:
        elapsed = time.perf_counter() - self.t0
        loss, mse, penalty = (self.sums / max(self.n, 1)).tolist()
        return {"step": done, "loss": loss, "mse": mse, "penalty": penalty, "grad_norm": _num(grad_norm), "lr": lr,
                "steps_per_s": self.steps / elapsed, "images_per_s": self.steps * batch_size / elapsed}

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - start


class RunClock:
    """What the run has cost so far: wall-clock seconds and this process's CPU seconds (all its
    threads) since step 0, evaluations and checkpoints included. Every log record carries both
    (`wall_seconds`, `cpu_seconds`), and every checkpoint stores them too: a resumed run continues
    from its checkpoint's cost, so work that a stopped process did after that checkpoint is redone
    and counted once. A checkpoint of an older version continues from the log's last record it
    keeps (the time between that record and the checkpoint is not counted); a run resumed from a
    log whose last record lacks these fields has an unknown cost, and its records leave them out."""

    KEYS = ("wall_seconds", "cpu_seconds")
    timers = (time.perf_counter, time.process_time)

    def __init__(self, wall_seconds: float = 0.0, cpu_seconds: float = 0.0, known: bool = True):
        self.offset, self.known = (wall_seconds, cpu_seconds), known
        self.start = self._now()

    def _now(self) -> tuple[float, float]:
        return tuple(timer() for timer in self.timers)

    @classmethod
    def resume(cls, log: "JsonlLog", step: int, saved: dict | None = None) -> "RunClock":
        """The clock of a run resumed at `step`: from the checkpoint's `saved` fields, else from the
        log's last record."""
        if step == 0:
            return cls()
        last = saved if saved is not None else log.last()
        return cls(*(last[k] for k in cls.KEYS)) if last is not None and cls.KEYS[0] in last else cls(known=False)

    def fields(self) -> dict:
        if not self.known:
            return {}
        return {k: round(offset + t - t0, 3) for k, offset, t, t0 in zip(self.KEYS, self.offset, self._now(), self.start)}


@dataclass
class Run:
    """Everything the loop needs, built by `_setup` (fresh, resumed, or started from other weights)."""

    cfg: Config
    out: Path
    env: DistEnv
    model: nn.Module                    # the backbone (FSDP: sharded in place)
    wrapped: nn.Module                  # what the loss calls: DDP / compile around the model
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    monitor: DivergenceMonitor | None
    stream: BatchStream
    log: JsonlLog
    schedule: object
    loss_cfg: object
    condition: object                   # labels of a batch -> the model's condition (factory.training_condition)
    prompts: list[str] | None           # sample-grid prompts of a caption-file model
    timestep_density: torch.Tensor | None = None   # training distribution of the steps (None: uniform)
    start_step: int = 0
    bad_steps: int = 0
    clock: RunClock | None = None       # the run's cost so far, in every log record
    window: StatsWindow = field(default_factory=StatsWindow)   # the steps since the last log record
    last_loss: float = float("nan")

    @property
    def fsdp(self) -> bool:
        return self.env.distributed and self.cfg.train.parallel == "fsdp"


@dataclass
class StepResult:
    loss: torch.Tensor                  # (3,) loss, mse, penalty: mean over the processes
    grad_norm: torch.Tensor
    tracer: object                      # diagnostics tracer (UnitTracer) of a diagnostics step, else None
    lr: float


def _train(cfg: Config, out: Path, resume: bool, progress: bool, env: DistEnv | None) -> dict:
    run = _setup(cfg, out, resume, progress, env)
    _evaluate_if_missed(run)                            # before the first window: not training time
    tc = run.cfg.train
    bar = tqdm(total=tc.steps, initial=run.start_step, disable=not (progress and run.env.is_main), desc="train",
               dynamic_ncols=True)
    run.window.t0 = time.perf_counter()                 # setup and a missed evaluation are not training time
    for step in range(run.start_step, tc.steps):
        done = step + 1
        diagnostics_now = tc.diagnostics_every > 0 and done % tc.diagnostics_every == 0
        result = _train_step(run, step, diagnostics_now)
        run.window.add(_apply_update(run, result, done, bar))
        bar.update(1)
        if done % tc.log_every == 0 or done == tc.steps or diagnostics_now:
            _log_stats(run, run.window, result, done, bar)
            run.window = StatsWindow()
        with run.window.paused():                       # checkpoint and sample time is not training time
            _after_step(run, done)
    bar.close()
    run.log.close()
    grids = sorted((out / "samples").glob(f"step-{tc.steps:08d}*")) if (out / "samples").is_dir() else []
    return {"steps": tc.steps, "final_loss": run.last_loss, "samples": [str(p) for p in grids] or None,
            "checkpoint": str(latest_checkpoint(out))}


def _setup(cfg: Config, out: Path, resume: bool, progress: bool, env: DistEnv | None) -> Run:
    """Validate, build data, model, EMA, optimizer and log; restore a resumed run's state."""
    validate(cfg)
    env = env or init_distributed(cfg.train.device)
    tc = cfg.train
    warn_if_slow_bf16(env.device, tc.precision, "train.precision")
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints (latest {ckpt.name}); pass --resume to continue "
                         f"that run or choose another --out directory")
    loaded = load_checkpoint(ckpt) if (resume and ckpt is not None) else None
    if loaded is not None:
        check_resume_config(loaded["config_yaml"], cfg)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    barrier(env)

    dataset = build_dataset(cfg.data, env.device, progress=progress and env.is_main)
    expected = data_shape(cfg.data)
    frames = getattr(dataset, "num_frames", 0)
    if (dataset.channels, dataset.image_size, frames) != (*expected[:2], cfg.data.frames):
        raise ValueError(f"dataset gives {dataset.channels} channels, {dataset.image_size}px, {frames} frames; the "
                         f"config expects {expected[0]}, {expected[1]}px, {cfg.data.frames} frames")
    torch.manual_seed(tc.seed)                       # same initial weights on every rank and every run
    model = build_model_from_config(cfg).to(env.device)
    if tc.channels_last:                             # 4-D weights (convs) NHWC; the EMA copy inherits it
        model = model.to(memory_format=torch.channels_last)
    if model.num_classes and dataset.num_classes > model.num_classes:
        raise ValueError(f"dataset has {dataset.num_classes} classes but the model {model.num_classes}; "
                         f"fix data.num_classes")
    condition, prompts = training_condition(cfg, dataset, model, env.device)
    if loaded is None and tc.init_from:              # a new run from another run's weights (not a resume)
        fresh = load_initial_weights(model, tc.init_from)
        if env.is_main:
            print(f"init_from {tc.init_from}: {len(fresh)} tensors start fresh" + (f" ({', '.join(fresh[:4])}"
                  f"{' ...' if len(fresh) > 4 else ''})" if fresh else ""))
    ema = EMA(model, tc.ema_decay)
    if loaded is not None:
        model.load_state_dict(loaded["model"])
        ema.load_state_dict(loaded["ema"])

    wrapped: nn.Module = _wrap_parallel(model, tc.parallel, env) if env.distributed else model
    if tc.compile:
        wrapped = torch.compile(wrapped)
    # the optimizer comes after wrapping: FSDP replaces the parameters by sharded ones
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.adam_betas))
    run = Run(cfg, out, env, model, wrapped, ema, optimizer,
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, tc)),
              scaler=torch.amp.GradScaler(env.device.type) if tc.precision == "fp16" else None,
              monitor=DivergenceMonitor(tc.divergence_factor) if tc.divergence_factor else None,
              stream=BatchStream(dataset, tc.batch_size, tc.seed, env.rank, env.world_size, tc.grad_accum,
                                 cfg.data.hflip, cfg.data.num_workers),
              log=JsonlLog(out / "log.jsonl", env.is_main,
                           build_trackers(tc.loggers, out, _flat(cfg.to_dict())) if env.is_main else []),
              schedule=build_schedule(cfg), loss_cfg=build_loss_config(cfg), condition=condition, prompts=prompts)
    if loaded is not None:
        state = loaded["state"]
        load_optimizer_state(model, optimizer, state["optimizer"], run.fsdp)
        run.scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        if run.monitor is not None and state.get("divergence"):
            run.monitor.load_state_dict(state["divergence"])
        run.start_step, run.bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        if "log_window" in state:                    # (checkpoints of older versions lack it)
            run.window.load_state_dict(state["log_window"])
    run.timestep_density = run.loss_cfg.timestep_density(run.schedule)     # once, not per step
    run.log.truncate_after(run.start_step)
    run.clock = RunClock.resume(run.log, run.start_step, loaded["state"].get("clock") if loaded else None)
    if env.is_main and run.start_step == 0:
        run.log.write({"event": "start", "step": 0, "params": count_parameters(model), "world_size": env.world_size,
                       "config": cfg.to_dict(), **run.clock.fields()})
    return run


def _train_step(run: Run, step: int, diagnostics: bool) -> StepResult:
    """Forward and backward of one global batch (all micro-batches of this process); the noise,
    steps and dropout are drawn for the whole global batch from (seed, step) and sliced."""
    tc, env, stream = run.cfg.train, run.env, run.stream
    generator = torch.Generator().manual_seed(_step_seed(tc.seed, step, 0))
    torch.manual_seed(_step_seed(tc.seed, step, 1 + env.rank))
    draws = NoiseDraws.sample((tc.batch_size, *run.model.sample_shape), run.schedule.num_timesteps,
                              run.loss_cfg.label_drop, generator, density=run.timestep_density)
    draws = draws.slice(env.rank * stream.per_rank, (env.rank + 1) * stream.per_rank)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(3, device=env.device)           # loss, mse, penalty (this rank)
    tracer = None
    micro_batches = stream.step(step)
    for i, (x, y) in enumerate(micro_batches):
        d = draws.slice(i * stream.micro, (i + 1) * stream.micro).to(env.device)
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        if tc.channels_last and x.dim() == 4:          # images and noise NHWC, as the model's convs
            x = x.contiguous(memory_format=torch.channels_last)
            d = dataclasses.replace(d, noise=d.noise.contiguous(memory_format=torch.channels_last))
        last_micro = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last_micro or not hasattr(run.wrapped, "no_sync")) else run.wrapped.no_sync()
        with sync:
            with _autocast(tc.precision, env.device):
                res = diffusion_loss(run.wrapped, x, run.condition(y), run.schedule, run.loss_cfg,
                                     generator=generator, draws=d, diagnostics=diagnostics and i == 0)
            loss = res.loss / len(micro_batches)
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        tracer = res.tracer or tracer
        penalty = res.penalty.float() if res.penalty is not None else torch.zeros((), device=env.device)
        loss_sum += torch.stack([res.loss.detach().float(), res.mse.float(), penalty]) / len(micro_batches)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = _local(torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                                       tc.grad_clip if tc.grad_clip > 0 else math.inf))
    return StepResult(all_reduce_mean(loss_sum, env), grad_norm, tracer, run.scheduler.get_last_lr()[0])


def _apply_update(run: Run, result: StepResult, done: int, bar) -> torch.Tensor | None:
    """The optimizer and EMA step when loss and gradient are finite (under fp16 loss scaling the
    scaler judges the gradient); otherwise the step is skipped and logged, and max_bad_steps in a
    row, or a diverging loss, stop training. The lr schedule advances either way. Returns the
    step's (loss, mse, penalty) on the host if the step was taken, else None."""
    tc, scaler = run.cfg.train, run.scaler
    # one device-to-host read per step (on a GPU each read waits for the queued work): loss, mse,
    # penalty and the gradient norm together
    host = torch.cat([result.loss.detach().double(), result.grad_norm.detach().double().reshape(1)]).cpu()
    finite_loss = bool(torch.isfinite(host[:3]).all())
    ok = finite_loss if scaler is not None else (finite_loss and bool(torch.isfinite(host[3])))
    if ok:
        if scaler is not None:
            scaler.step(run.optimizer)
            scaler.update()
        else:
            run.optimizer.step()
        run.ema.update(run.model, done - 1)
        run.bad_steps = 0
        run.last_loss = float(host[0])
        if run.monitor is not None and run.monitor.diverged(done, run.last_loss):
            run.log.write({"step": done, "diverged": True, "loss": run.last_loss, "running_min": run.monitor.running_min})
            raise TrainingStopped(
                f"training diverged at step {done}: loss {run.last_loss:.4g} is above {tc.divergence_factor:g}x its "
                f"running minimum {run.monitor.running_min:.4g}. Lower train.lr, raise train.warmup_steps or keep "
                f"train.grad_clip > 0.", step=done)
    else:
        run.optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        run.bad_steps += 1
        loss, norm = _num(host[0]), _num(host[3])
        run.log.write({"step": done, "skipped": True, "loss": loss, "grad_norm": norm,
                       "consecutive_bad_steps": run.bad_steps})
        if run.env.is_main:
            bar.write(f"step {done}: non-finite loss/gradient (loss {loss}, grad norm {norm}); step skipped "
                      f"({run.bad_steps}/{tc.max_bad_steps})")
        if run.bad_steps >= tc.max_bad_steps:
            last = latest_checkpoint(run.out)
            raise TrainingStopped(
                f"training stopped at step {done}: {run.bad_steps} consecutive steps had a non-finite loss or "
                f"gradient. Lower train.lr, keep train.grad_clip > 0, use train.precision=fp32 or bf16, or "
                f"check the data for NaNs. Last good checkpoint: {last if last else 'none'}.", step=done)
    with warnings.catch_warnings():          # a skipped first step still advances the lr schedule
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.scheduler.step()
    return host[:3] if ok else None


def _log_stats(run: Run, window: StatsWindow, result: StepResult, done: int, bar) -> None:
    record = window.record(done, result.grad_norm, result.lr, run.cfg.train.batch_size) | run.clock.fields()
    if run.loss_cfg.gamma == 0:
        record.pop("penalty")
    if result.tracer is not None:
        record["diagnostics"] = result.tracer.diagnostics()
    run.log.write(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.2f}")


def _after_step(run: Run, done: int) -> None:
    """The hooks of a finished step: checkpoint, sample grid, evaluation, each at its interval."""
    tc, env = run.cfg.train, run.env
    if done % tc.ckpt_every == 0 or done == tc.steps:
        _save(run, done)
    if env.is_main and ((tc.sample_every and done % tc.sample_every == 0) or done == tc.steps):
        grid = write_samples(run.ema.model, run.schedule, run.cfg, run.out / "samples" / f"step-{done:08d}.png",
                             env.device, run.prompts)
        run.log.images(grid, done)
    if env.is_main and tc.eval_every and done % tc.eval_every == 0:
        _evaluate(run, done)


def _evaluate(run: Run, done: int) -> None:
    from nrdm.metrics.evaluate import evaluate
    result = evaluate(run.ema.model, run.schedule, run.cfg, n=run.cfg.train.eval_n, device=run.env.device,
                      progress=False)
    run.log.write({"step": done, "eval": result["metrics"],
                   "eval_protocol": {k: result["protocol"][k] for k in
                                     ("n_fake", "n_real", "split", "feature_network_sha256", "sampler", "steps")},
                   **run.clock.fields()})


def _evaluate_if_missed(run: Run) -> None:
    """A run stopped after the checkpoint of a step but before that step's evaluation resumes from
    that checkpoint: evaluate it now, with the same EMA weights, so no point of the curve is lost."""
    tc, done = run.cfg.train, run.start_step
    if run.env.is_main and done > 0 and tc.eval_every and done % tc.eval_every == 0 and not run.log.has(done, "eval"):
        _evaluate(run, done)


def _save(run: Run, done: int) -> None:
    tc = run.cfg.train
    model_state, optimizer_state = full_states(run.model, run.optimizer, run.fsdp)   # collective under FSDP
    if run.env.is_main:
        state = {"step": done, "optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler is not None else {}, "bad_steps": run.bad_steps,
                 "divergence": run.monitor.state_dict() if run.monitor is not None else {},
                 "seed": tc.seed, "world_size": run.env.world_size,
                 "clock": run.clock.fields(), "log_window": run.window.state_dict()}
        save_checkpoint(run.out, done, model_state, run.ema.state_dict(), state, run.cfg.to_yaml(), tc.keep_last,
                        tc.keep_every, model_args=run.model.build_args)
    barrier(run.env)


def write_samples(model: nn.Module, schedule, cfg: Config, path: Path, device,
                  prompts: list[str] | None = None) -> list[Path]:
    """A grid of cfg.sample.n samples from fixed seeds (GIF/MP4/PNG for video); class-conditional
    models get one class per column (labels 0..K-1 repeated)."""
    s = cfg.sample
    condition, _, nrow = sample_conditions(model, cfg, s.n, prompts, grid=True)
    images = generate(model, schedule, s.n, condition, s, device=device, **output_kwargs(cfg, device))
    return save_samples(images, path, nrow=nrow)


def _num(value) -> float | str:
    v = float(value)
    return v if math.isfinite(v) else str(v)


def _local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded (DTensor) one."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _wrap_parallel(model: nn.Module, parallel: str, env: DistEnv) -> nn.Module:
    """DDP: replicate the model, all-reduce gradients. FSDP (FSDP2 `fully_shard`): shard
    parameters, gradients and optimizer state across ranks, block by block, for models that do
    not fit one device; `model` itself becomes the sharded module."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # a backbone whose plain forward leaves parameters unused (multires: the coarse branches' heads)
        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                       find_unused_parameters=getattr(model, "partial_forward", False))
    try:
        from torch.distributed.fsdp import fully_shard               # public from torch 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard    # torch 2.4, 2.5
        except ImportError:
            raise ValueError(f"train.parallel=fsdp needs FSDP2's fully_shard (torch >= 2.4); this is torch "
                             f"{torch.__version__}. Use train.parallel=ddp or upgrade torch.") from None

    for module in model.fsdp_units():           # each backbone declares its units
        fully_shard(module)
    fully_shard(model)
    return model


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts, the optimizer's keyed by parameter name (the
    same format with and without FSDP). Under FSDP all ranks must call; rank 0 gets them on CPU."""
    if not fsdp:
        return model.state_dict(), _optimizer_state_by_name(model, optimizer)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    index = _param_index(model, optimizer)
    name_to_index = {name: i for i, name in index.items()}
    optimizer.load_state_dict({
        "state": {name_to_index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [name_to_index[n] for n in group["params"]]}
                         for group in state["param_groups"]]})


def _param_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Optimizer state index -> parameter name (indices run over the param groups in order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: names[id(p)] for i, p in enumerate(params)}


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    index = _param_index(model, optimizer)
    sd = optimizer.state_dict()
    return {"state": {index[i]: value for i, value in sd["state"].items()},
            "param_groups": [{**group, "params": [index[i] for i in group["params"]]} for group in sd["param_groups"]]}
