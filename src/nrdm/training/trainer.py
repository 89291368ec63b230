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
- Rank 0 logs JSONL (step, loss, grad norm, lr, steps/s, images/s, diagnostics) and stdout,
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
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from nrdm.config import Config, from_dict
from nrdm.data import BatchStream
from nrdm.data.registry import data_shape
from nrdm.diffusion import NoiseDraws, diffusion_loss
from nrdm.factory import (build_dataset, build_loss_config, build_model_from_config, build_schedule, output_kwargs,
                          text_encoder, validate)
from nrdm.models import count_parameters, no_weight_decay_names
from nrdm.sampling import generate, sample_conditions, sample_options, save_samples
from nrdm.checkpoint import latest_checkpoint, load_checkpoint, load_initial_weights, save_checkpoint
from nrdm.training.divergence import DivergenceMonitor
from nrdm.training.distributed import DistEnv, all_reduce_mean, barrier, init_distributed
from nrdm.training.ema import EMA
from nrdm.training.trackers import build_trackers

# config keys that may change when a run is resumed: the budget, logging and sampling, and what
# changes how, not what, is computed (compilation, activation recomputation, the device, where
# the data lives, loader workers)
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep_last", "train.keep_every",
                     "train.sample_every",
                     "train.diagnostics_every", "train.eval_every", "train.eval_n", "train.max_bad_steps",
                     "train.divergence_factor", "train.loggers", "train.compile", "train.device", "model.grad_checkpointing",
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


def _train(cfg: Config, out: Path, resume: bool, progress: bool, env: DistEnv | None) -> dict:
    validate(cfg)
    env = env or init_distributed(cfg.train.device)
    tc = cfg.train
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
    build_args = model.build_args                   # saved with every checkpoint (model.json)
    if model.num_classes and dataset.num_classes > model.num_classes:
        raise ValueError(f"dataset has {dataset.num_classes} classes but the model {model.num_classes}; "
                         f"fix data.num_classes")
    schedule = build_schedule(cfg)
    loss_cfg = build_loss_config(cfg)
    encoder = text_encoder(cfg, env.device)
    caption_embeddings = None                   # text models: every caption of the data, encoded once
    prompts = None                              # grids of a caption-file model: its first captions
    if encoder is not None:
        caption_embeddings = encoder(dataset.caption_table)
        prompts = None if cfg.data.captions else dataset.caption_table[:10]
        model.embed.text.set_null(encoder([""]))  # the empty caption: guidance and caption dropout
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, tc))
    scaler = torch.amp.GradScaler(env.device.type) if tc.precision == "fp16" else None
    start_step, bad_steps = 0, 0
    fsdp = env.distributed and tc.parallel == "fsdp"
    if loaded is not None:
        state = loaded["state"]
        load_optimizer_state(model, optimizer, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step, bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
    monitor = DivergenceMonitor(tc.divergence_factor) if tc.divergence_factor else None
    if monitor is not None and loaded is not None and loaded["state"].get("divergence"):
        monitor.load_state_dict(loaded["state"]["divergence"])

    stream = BatchStream(dataset, tc.batch_size, tc.seed, env.rank, env.world_size, tc.grad_accum,
                         cfg.data.hflip, cfg.data.num_workers)
    trackers = build_trackers(tc.loggers, out, _flat(cfg.to_dict())) if env.is_main else []
    log = JsonlLog(out / "log.jsonl", env.is_main, trackers)
    log.truncate_after(start_step)
    if env.is_main and start_step == 0:
        log.write({"event": "start", "step": 0, "params": count_parameters(model), "world_size": env.world_size,
                   "config": cfg.to_dict()})
    conditional = model.conditional
    generator = torch.Generator()
    sample_shape = (tc.batch_size, *model.sample_shape)
    t_density = loss_cfg.timestep_density(schedule)

    bar = tqdm(total=tc.steps, initial=start_step, disable=not (progress and env.is_main), desc="train",
               dynamic_ncols=True)
    window = {"loss": 0.0, "mse": 0.0, "penalty": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}
    last_loss = float("nan")
    for step in range(start_step, tc.steps):
        done = step + 1
        generator.manual_seed(_step_seed(tc.seed, step, 0))
        torch.manual_seed(_step_seed(tc.seed, step, 1 + env.rank))
        draws = NoiseDraws.sample(sample_shape, schedule.num_timesteps, loss_cfg.label_drop, generator,
                                  density=t_density)
        draws = draws.slice(env.rank * stream.per_rank, (env.rank + 1) * stream.per_rank)
        diagnostics_now = tc.diagnostics_every > 0 and done % tc.diagnostics_every == 0
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(3, device=env.device)           # loss, mse, penalty (this rank)
        tracer = None
        micro_batches = stream.step(step)
        for i, (x, y) in enumerate(micro_batches):
            d = draws.slice(i * stream.micro, (i + 1) * stream.micro).to(env.device)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            last_micro = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last_micro or not hasattr(wrapped, "no_sync")) else wrapped.no_sync()
            with sync:
                with _autocast(tc.precision, env.device):
                    if caption_embeddings is not None:
                        y = caption_embeddings.index(y.cpu()).to(env.device)          # caption ids -> text
                    res = diffusion_loss(wrapped, x, y if conditional else None, schedule, loss_cfg,
                                         generator=generator, draws=d, diagnostics=diagnostics_now and i == 0)
                loss = res.loss / len(micro_batches)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            tracer = res.tracer or tracer
            loss_sum += torch.stack([res.loss.detach().float(), res.mse.float(),
                                     res.penalty.float() if res.penalty is not None else torch.zeros((), device=env.device)
                                     ]) / len(micro_batches)

        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = _local(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           tc.grad_clip if tc.grad_clip > 0 else math.inf))
        step_loss = all_reduce_mean(loss_sum, env)
        finite_loss = bool(torch.isfinite(step_loss).all())
        ok = finite_loss if scaler is not None else (finite_loss and bool(torch.isfinite(grad_norm)))
        lr = scheduler.get_last_lr()[0]
        if ok:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            ema.update(model, step)
            bad_steps = 0
            last_loss = float(step_loss[0])
            window["loss"] += float(step_loss[0])
            window["mse"] += float(step_loss[1])
            window["penalty"] += float(step_loss[2])
            window["n"] += 1
            if monitor is not None and monitor.diverged(done, last_loss):
                log.write({"step": done, "diverged": True, "loss": last_loss, "running_min": monitor.running_min})
                raise TrainingStopped(
                    f"training diverged at step {done}: loss {last_loss:.4g} is above {tc.divergence_factor:g}x its "
                    f"running minimum {monitor.running_min:.4g}. Lower train.lr, raise train.warmup_steps or keep "
                    f"train.grad_clip > 0.", step=done)
        else:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()
            bad_steps += 1
            log.write({"step": done, "skipped": True, "loss": _num(step_loss[0]), "grad_norm": _num(grad_norm),
                       "consecutive_bad_steps": bad_steps})
            if env.is_main:
                bar.write(f"step {done}: non-finite loss/gradient (loss {_num(step_loss[0])}, grad norm "
                          f"{_num(grad_norm)}); step skipped ({bad_steps}/{tc.max_bad_steps})")
            if bad_steps >= tc.max_bad_steps:
                last = latest_checkpoint(out)
                raise TrainingStopped(
                    f"training stopped at step {done}: {bad_steps} consecutive steps had a non-finite loss or "
                    f"gradient. Lower train.lr, keep train.grad_clip > 0, use train.precision=fp32 or bf16, or "
                    f"check the data for NaNs. Last good checkpoint: {last if last else 'none'}.", step=done)
        with warnings.catch_warnings():          # a skipped first step still advances the lr schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
        window["steps"] += 1
        bar.update(1)

        if done % tc.log_every == 0 or done == tc.steps or diagnostics_now:
            elapsed = time.perf_counter() - window["t0"]
            n = max(window["n"], 1)
            record = {"step": done, "loss": window["loss"] / n, "mse": window["mse"] / n,
                      "grad_norm": _num(grad_norm), "lr": lr, "steps_per_s": window["steps"] / elapsed,
                      "images_per_s": window["steps"] * tc.batch_size / elapsed}
            if loss_cfg.gamma > 0:
                record["penalty"] = window["penalty"] / n
            if tracer is not None:
                record["diagnostics"] = tracer.diagnostics()
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.2f}")
            window = {"loss": 0.0, "mse": 0.0, "penalty": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}

        io_start = time.perf_counter()                  # checkpoint and sample time is not training time
        if done % tc.ckpt_every == 0 or done == tc.steps:
            model_state, optimizer_state = full_states(model, optimizer, fsdp)   # collective under FSDP
            if env.is_main:
                save_checkpoint(out, done, model_state, ema.state_dict(),
                                {"step": done, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                                 "scaler": scaler.state_dict() if scaler is not None else {}, "bad_steps": bad_steps,
                                 "divergence": monitor.state_dict() if monitor is not None else {},
                                 "seed": tc.seed, "world_size": env.world_size},
                                cfg.to_yaml(), tc.keep_last, tc.keep_every, model_args=build_args)
            barrier(env)
        if env.is_main and ((tc.sample_every and done % tc.sample_every == 0) or done == tc.steps):
            grid = write_samples(ema.model, schedule, cfg, out / "samples" / f"step-{done:08d}.png", env.device, prompts)
            log.images(grid, done)
        if env.is_main and tc.eval_every and done % tc.eval_every == 0:
            from nrdm.metrics.evaluate import evaluate
            result = evaluate(ema.model, schedule, cfg, n=tc.eval_n, device=env.device, progress=False)
            log.write({"step": done, "eval": result["metrics"],
                       "eval_protocol": {k: result["protocol"][k] for k in
                                         ("n_fake", "n_real", "split", "feature_network_sha256", "sampler", "steps")}})
        window["t0"] += time.perf_counter() - io_start
    bar.close()
    log.close()
    grids = sorted((out / "samples").glob(f"step-{tc.steps:08d}*")) if (out / "samples").is_dir() else []
    return {"steps": tc.steps, "final_loss": last_loss, "samples": [str(p) for p in grids] or None,
            "checkpoint": str(latest_checkpoint(out))}


def write_samples(model: nn.Module, schedule, cfg: Config, path: Path, device,
                  prompts: list[str] | None = None) -> list[Path]:
    """A grid of cfg.sample.n samples from fixed seeds (GIF/MP4/PNG for video); class-conditional
    models get one class per column (labels 0..K-1 repeated)."""
    s = cfg.sample
    condition, _, nrow = sample_conditions(model, cfg, s.n, prompts, grid=True)
    images = generate(model, schedule, s.n, condition, s.sampler, s.steps, s.cfg_scale, seed=s.seed, device=device,
                      options=sample_options(s), **output_kwargs(cfg, device))
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

    from nrdm.models.blocks import TransformerBlock
    from nrdm.models.unet import Stage
    for module in model.modules():
        if isinstance(module, (TransformerBlock, Stage)):
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
