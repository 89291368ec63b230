"""From a run configuration to the objects it describes (model, schedule, loss settings)."""
from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

from nrdm.checkpoint import find_checkpoint, load_checkpoint, write_model_args
from nrdm.config import DEVICES, TRACKERS, Config, ModelConfig
from nrdm.data.latents import LatentShards, extract_latent_shards, source_fingerprint
from nrdm.data.registry import build_dataset as build_pixel_dataset
from nrdm.data.registry import check_video, data_shape, dataset_spec, pixel_config
from nrdm.diffusion import LossConfig, VPSchedule
from nrdm.models import build_model
from nrdm.models.registry import MODEL_SIZES, VIDEO_BACKBONES, backbone_options
from nrdm.utils.cache import cache_dir

# ModelConfig keys that are not backbone options: the rest pass through to build_model
_NOT_BACKBONE_OPTIONS = ("size", "backbone", "conditional", "text_encoder", "text_tokens", "grad_checkpointing")


def resolved_backbone(m: ModelConfig) -> str | None:
    """model.backbone, or the one its registry size implies."""
    return m.backbone or MODEL_SIZES.get(m.size or "", {}).get("backbone")


def model_kwargs(cfg: Config) -> dict:
    """Keyword arguments for build_model: the model section's set keys plus the data's shape."""
    channels, image_size, num_classes = data_shape(cfg.data)
    m = cfg.model
    backbone = resolved_backbone(m)
    options = backbone_options(backbone) if backbone else None
    kwargs = {"backbone": m.backbone} if m.backbone else {}
    for f in dataclasses.fields(m):
        value = getattr(m, f.name)
        if f.name in _NOT_BACKBONE_OPTIONS or value is None:
            continue
        if options is not None and f.name not in options:       # another backbone's option (e.g. a preset's)
            warnings.warn(f"model.{f.name}={value!r} is not an option of backbone {backbone!r}; ignored")
            continue
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    kwargs.update(image_size=image_size, in_channels=channels, num_classes=num_classes if m.conditional else 0,
                  num_timesteps=cfg.diffusion.num_timesteps)
    if cfg.data.frames:
        kwargs["num_frames"] = cfg.data.frames
    if m.text_encoder:
        kwargs["text_dim"] = text_encoder(cfg).encoder.pooled_dim
        if backbone in ("flow", "u-transformer", "multires"):
            kwargs["text_tokens"] = m.text_tokens
    return kwargs


@functools.lru_cache(maxsize=4)
def _text_encoder(spec: str, tokens: int):
    from nrdm.models.text_encoders import CachedTextEncoder, build_text_encoder
    return CachedTextEncoder(build_text_encoder(spec, max(tokens, 1)))


def text_encoder(cfg: Config, device: torch.device | str | None = None):
    """The run's text encoder (a CachedTextEncoder; loaded once per process), or None; with
    `device`, its network is moved there (embeddings are returned on the CPU either way)."""
    if not cfg.model.text_encoder:
        return None
    cached = _text_encoder(cfg.model.text_encoder, cfg.model.text_tokens)
    if device is not None:
        cached.encoder.to(device)
    return cached


@functools.lru_cache(maxsize=2)
def _codec(spec: str):
    from nrdm.models.autoencoder import build_codec
    return build_codec(spec)


def latent_codec(data):
    """The autoencoder of a DataConfig (loaded once per process) when data.vae is set, else None.
    Its latent shape must match data.latent_channels / data.vae_downsample."""
    if not data.vae:
        return None
    codec = _codec(data.vae)
    if (codec.latent_channels, codec.downsample) != (data.latent_channels, data.vae_downsample):
        raise ValueError(f"{data.vae} makes {codec.latent_channels}-channel latents at 1/{codec.downsample} "
                         f"resolution; set data.latent_channels={codec.latent_channels} and "
                         f"data.vae_downsample={codec.downsample}")
    return codec


def build_dataset(data, device: torch.device | str = "cpu", progress: bool = True) -> torch.utils.data.Dataset:
    """The training data of a DataConfig: pixels (nrdm.data.build_dataset), or, when data.vae is
    set, their latents read memory-mapped from the cache (extracted on first use on `device`)."""
    pixels = build_pixel_dataset(pixel_config(data))
    return latent_dataset(data, pixels, device, progress=progress) if data.vae else pixels


def latent_dataset(data, pixels, device: torch.device | str = "cpu", batch_size: int = 64,
                   shard_size: int = 16384, progress: bool = True) -> LatentShards:
    """The dataset's latents under $NRDM_CACHE/latents/<key>/ (nrdm.data.latents), the key made of
    dataset, split, size, autoencoder, options and the source's fingerprint: extracted once in
    shards (by every process of a distributed run, each its share), then only read."""
    codec = latent_codec(data).to(device)
    rgb = getattr(pixels, "channels", 3) == 1 and codec.in_channels == 3     # grayscale data, RGB autoencoder

    def encode(images, indices):
        x = images.to(device)
        x = x.expand(-1, 3, *x.shape[2:]) if rgb else x
        return codec.encode(x, seeds=indices if data.latent_sample == "posterior" else None).cpu()

    fingerprint = source_fingerprint(pixels)
    options = data.latent_sample + ("-flip" if data.latent_flip else "")
    key = (f"{data.name}-{data.split}-{data.image_size}px-{codec.identity}-{options}-{fingerprint[:16]}"
           .replace("/", "_").replace(":", "_"))
    identity = {"codec": codec.identity, "dataset": data.name, "split": data.split, "image_size": data.image_size,
                "latent_sample": data.latent_sample, "source_sha256": fingerprint}
    out = extract_latent_shards(pixels, encode, cache_dir() / "latents" / key, identity, shard_size, batch_size,
                                data.num_workers, data.latent_flip, progress)
    for name in ("caption_table", "class_labels"):
        if hasattr(pixels, name):
            setattr(out, name, getattr(pixels, name))
    return out


def training_condition(cfg: Config, dataset, model: nn.Module, device=None):
    """(condition, prompts) for training on `dataset`: condition(labels of a batch) -> what the
    model takes (None for an unconditional model; for a text model the caption ids become their
    embeddings, every caption of the data encoded once, and the model's null condition is set to
    the empty caption's); prompts: the sample-grid prompts of a caption-file model (else None)."""
    if not model.conditional:
        return (lambda labels: None), None
    encoder = text_encoder(cfg, device)
    if encoder is None:
        return (lambda labels: labels), None
    captions = encoder(dataset.caption_table)
    model.embed.text.set_null(encoder([""]))          # the empty caption: guidance and caption dropout
    prompts = None if cfg.data.captions else dataset.caption_table[:10]
    return (lambda ids: captions.index(ids.cpu()).to(ids.device)), prompts


def output_kwargs(cfg: Config, device: torch.device | str = "cpu") -> dict:
    """Keyword arguments for sampling.generate: latent models sample unclipped latents and decode
    them with the autoencoder, moved to the device the samples are on."""
    codec = latent_codec(cfg.data)
    return {} if codec is None else {"clip_x0": None, "decode": codec.to(device).decode}


def model_args(cfg: Config) -> dict:
    """The model's resolved build arguments, JSON-ready: {"size": ..., **model_kwargs(cfg)}. Saved
    with every checkpoint (model.json) so the model rebuilds where the data is not."""
    return {"size": cfg.model.size, **{k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs(cfg).items()}}


def build_model_from_args(args: dict, grad_checkpointing: bool = False) -> nn.Module:
    """The model of `model_args` (e.g. read from a checkpoint's model.json); it keeps them as
    `model.build_args` for checkpoints and exports."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k != "size"}
    model = build_model(args.get("size"), **kwargs)
    model.grad_checkpointing = grad_checkpointing
    model.build_args = dict(args)
    return model


def build_model_from_config(cfg: Config) -> nn.Module:
    return build_model_from_args(model_args(cfg), cfg.model.grad_checkpointing)


def build_schedule(cfg: Config) -> VPSchedule:
    d = cfg.diffusion
    return VPSchedule(d.schedule, d.num_timesteps, d.prediction)


def build_loss_config(cfg: Config) -> LossConfig:
    d = cfg.diffusion
    return LossConfig(gamma=d.gamma, penalty_units=d.penalty_units, probe=d.probe, label_drop=d.label_drop,
                      min_snr_gamma=d.min_snr_gamma, timestep_sampling=d.timestep_sampling,
                      logit_mean=d.logit_mean, logit_std=d.logit_std, branch_weights=d.branch_weights,
                      vlb_weight=d.vlb_weight)


def validate(cfg: Config) -> None:
    """Check every choice in the config without building anything large (raises ValueError)."""
    from nrdm.diffusion import SAMPLERS, SPACINGS, VARIANCES
    from nrdm.models.gated_unit import UnitConfig

    build_schedule(cfg)
    build_loss_config(cfg)
    UnitConfig(cfg.model.variant, cfg.model.gate_init, cfg.model.gate_source, cfg.model.gate_shape,
               cfg.model.fused_gates)
    t = cfg.train
    for name, value, allowed in [("train.precision", t.precision, ("fp32", "bf16", "fp16")),
                                 ("train.parallel", t.parallel, ("ddp", "fsdp")),
                                 ("train.device", t.device, DEVICES),
                                 ("train.lr_schedule", t.lr_schedule, ("constant", "cosine")),
                                 ("data.latent_sample", cfg.data.latent_sample, ("mean", "posterior")),
                                 ("sample.spacing", cfg.sample.spacing, SPACINGS),
                                 ("sample.precision", cfg.sample.precision, ("fp32", "bf16", "fp16")),
                                 ("sample.variance", cfg.sample.variance, VARIANCES),
                                 ("sample.sampler", cfg.sample.sampler, tuple(SAMPLERS))]:
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    unknown = [name for name in t.loggers if name not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown train.loggers {unknown}; allowed: {', '.join(TRACKERS)} (log.jsonl is always written)")
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.log_every": t.log_every, "train.ckpt_every": t.ckpt_every, "sample.steps": cfg.sample.steps,
                "sample.cache_interval": cfg.sample.cache_interval,
                "data.image_size": cfg.data.image_size}
    bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
    if bad:
        raise ValueError(f"these config values must be >= 1: {', '.join(bad)}")
    interval = cfg.sample.guidance_interval
    if interval is not None and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
        raise ValueError(f"sample.guidance_interval must be [lo, hi] with 0 <= lo < hi (noise levels sigma), got {interval}")
    if not 0.0 <= cfg.sample.cfg_rescale <= 1.0:
        raise ValueError(f"sample.cfg_rescale must lie in [0, 1], got {cfg.sample.cfg_rescale}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must lie in [0, 1), got {t.ema_decay}")
    if not 0.0 <= t.min_lr <= t.lr:
        raise ValueError(f"train.min_lr must lie in [0, train.lr={t.lr}], got {t.min_lr}")
    if cfg.model.fused_gates and t.parallel == "fsdp":
        raise ValueError("model.fused_gates with train.parallel=fsdp: the fused head keeps checkpoints in the "
                         "per-unit layout, which FSDP's sharded state dicts do not go through; use "
                         "train.parallel=ddp or model.fused_gates=false")
    if t.channels_last and t.parallel == "fsdp":
        raise ValueError("train.channels_last with train.parallel=fsdp: FSDP shards only contiguous (NCHW) "
                         "parameters; use train.parallel=ddp or train.channels_last=false")
    check_video(cfg.data)
    captioned = cfg.data.captions or dataset_spec(cfg.data.name).captioned
    if captioned != bool(cfg.model.text_encoder):
        raise ValueError("caption data (data.captions=true or data.name=captions) and model.text_encoder go "
                         "together: set both (e.g. model.text_encoder=minilm) or neither")
    backbone = resolved_backbone(cfg.model)
    if cfg.data.frames > 0 and backbone not in VIDEO_BACKBONES:
        raise ValueError(f"data.frames={cfg.data.frames} (video) with model backbone {backbone!r}: video needs "
                         f"model.backbone=video (Latte-like, e.g. model.size=Latte-S/2) or unet (space-time U-Net)")
    if cfg.diffusion.branch_weights is not None and backbone != "multires":
        raise ValueError(f"diffusion.branch_weights (the multi-resolution loss) needs model.backbone=multires, "
                         f"not {backbone!r}; unset it (diffusion.branch_weights=null) for this backbone")
    if cfg.data.frames == 0 and backbone == "video":
        raise ValueError("model.backbone=video needs video data (data.frames > 0, e.g. data.name=moving-digits)")


def load_run(run_dir: str | Path, use_ema: bool = True, checkpoint: str | None = None):
    """(config, model in eval mode, schedule, checkpoint dir) of a run's latest checkpoint, or of
    `checkpoint` ("step-N", N or a path)."""
    from nrdm.config import from_dict

    ckpt = find_checkpoint(run_dir, checkpoint)
    loaded = load_checkpoint(ckpt, weights_only=True)
    cfg = from_dict(yaml.safe_load(loaded["config_yaml"]))
    args = loaded["model_args"]
    if args is None:                # a checkpoint from before model.json: resolve once, where the data is
        try:
            args = model_args(cfg)
        except (ValueError, OSError, ImportError) as err:
            raise ValueError(f"{ckpt} predates model.json (the model's saved build arguments) and they cannot be "
                             f"resolved here: {err}. Run `nrdm info {run_dir}` once where the run's data and "
                             f"text model are; it writes them into the checkpoint") from err
        try:
            write_model_args(ckpt, args)
        except OSError:             # a read-only copy: resolve again next time
            pass
    model = build_model_from_args(args, cfg.model.grad_checkpointing)
    model.load_state_dict(loaded["ema" if use_ema else "model"])
    return cfg, model.eval(), build_schedule(cfg), ckpt
