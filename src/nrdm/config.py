"""The run configuration: a typed schema (dataclasses), YAML files, presets, dotted overrides.

    cfg = load_config("digits", overrides=["train.steps=200", "model.variant=resnet"])
    cfg = load_config("my_run.yaml")

Every key is checked: an unknown key or a value of the wrong type is a ValueError that suggests
the nearest valid keys / names the expected type. Presets live in `nrdm/configs/*.yaml` (also reachable as
`configs/` at the repository root).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TRACKERS = ("tensorboard", "wandb")   # train.loggers: experiment trackers besides log.jsonl
DEVICES = ("auto", "cpu", "cuda")     # train.device and --device; auto = cuda when available

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    size: str | None = None                 # registry name (DiT-S/2, U-ViT-H/2, UNet-S, ...); keys below override
    backbone: str | None = None             # flow | u-transformer | unet | video | multires (implied by size)
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    channel_mult: list[int] | None = None   # unet
    attention_resolution: int | None = None  # unet
    temporal_resolution: int | None = None  # unet on video: temporal attention at resolutions <= this (None: all)
    dropout: float | None = None            # unet
    skip_scaling: str | None = None         # u-transformer, unet: none | constant | learned
    skip_kappa: float | None = None
    branch_widths: list[int] | None = None  # multires: ConvNeXt branches' widths, coarse to fine
    branch_depths: list[int] | None = None  # multires: blocks per ConvNeXt branch
    kernel_size: int | None = None          # multires: depthwise conv kernel of the ConvNeXt blocks (7)
    branch_feed: str | None = None          # multires: add | concat (previous branch's upsampled features)
    cross_skips: bool | None = None         # multires: every block also gets the previous branch's block output
    first_branch: str | None = None         # multires: transformer | convnext (the paper's ablation)
    learn_sigma: bool | None = None         # flow: 2C outputs, prediction + variance interpolation (DiT's)
    embeddings: str | None = None           # flow: nrdm | dit | diffusers (position/timestep tables; DiT imports)
    activation: str | None = None           # transformers: gelu-tanh (DiT's, default) | gelu (exact; faster on CPUs)
    variant: str = "nrdm"                   # nrdm | adaln | scaled-skip | resnet | rezero | adaln-zero
    gate_init: str = "auto"
    gate_source: str = "cond"
    gate_shape: str = "channel"
    fused_gates: bool = False               # all units' gate heads in one linear map (same function, checkpoints)
    input_conditioning: str = "auto"
    conditional: bool = True                # class-conditional when the data has labels
    text_encoder: str | None = None         # text-to-image: minilm | st:PATH | transformers path or hub name
    text_tokens: int = 8                    # text tokens in context (token backbones); 0 = pooled text only
    grad_checkpointing: bool = False


@dataclass
class DiffusionConfig:
    schedule: str = "linear"                # linear | cosine
    num_timesteps: int = 1000
    prediction: str = "eps"                 # eps | v
    gamma: float = 0.0                      # residual-sensitivity penalty weight
    penalty_units: int = 1
    probe: str = "gaussian"
    label_drop: float = 0.1
    min_snr_gamma: float = 0.0              # Min-SNR-gamma loss weighting (Hang et al. 2023; 5 there); 0 = off
    timestep_sampling: str = "uniform"      # uniform | logit-normal (SD3's density, in log-SNR terms)
    logit_mean: float = 0.0                 # logit-normal: location m and scale s of u, log-SNR = -2u
    logit_std: float = 1.0
    branch_weights: list[float] | None = None  # multires: loss weight of each branch's prediction, coarse to
                                            # fine (DiMR: [0.25, 1]); None = the last branch only
    vlb_weight: float = 0.0                 # hybrid loss (improved DDPM): + w L_t in bits/dim, training the
                                            # learned variance (model.learn_sigma); DiT: 1; 0 = off


@dataclass
class DataConfig:
    name: str = "digits"                    # digits | mnist | fashion | folder | captions (root = JSONL/CSV)
                                            # | moving-digits | video-folder
    root: str | None = None                 # idx(.gz) directory or image folder
    split: str = "train"                    # train | test (idx datasets)
    image_size: int = 16
    hflip: bool = False
    skip_corrupt: bool = False              # folder: skip unreadable images with a warning
    num_classes: int | None = None          # folder: override the count of class subfolders
    num_workers: int = 0
    captions: bool = False                  # digits/mnist/fashion: caption each image from class templates
    frames: int = 0                         # video: frames per clip (0 = image data)
    frame_stride: int = 1                   # video-folder: take every n-th frame
    num_clips: int = 4096                   # moving-digits: clips in the train split (a quarter in test)
    num_digits: int = 1                     # moving-digits: digits per clip (label = the first one's class)
    digit_size: int = 0                     # moving-digits: digit height in pixels (0 = image_size / 2)
    speed: float = 2.0                      # moving-digits: pixels per frame
    vae: str | None = None                  # latent diffusion: diffusers AutoencoderKL path or hub name
    latent_channels: int = 4
    vae_downsample: int = 8
    latent_sample: str = "mean"             # mean | posterior: extract the posterior mean or a seeded draw (DiT)
    latent_flip: bool = False               # also store the latents of mirrored images (used by data.hflip)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64                    # global batch (all processes, all accumulation steps)
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_schedule: str = "constant"           # constant | cosine (after the linear warm-up)
    min_lr: float = 0.0                     # cosine: the lr reached at train.steps
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0                  # max global grad norm (0 = off)
    ema_decay: float = 0.999
    precision: str = "fp32"                 # fp32 | bf16 | fp16 (autocast)
    compile: bool = False
    channels_last: bool = False             # NHWC model and image batches: pays for convs on GPU tensor cores
                                            # and oneDNN bf16; slower for the U-Net on an AVX2 CPU (docs/performance.md)
    parallel: str = "ddp"                   # ddp | fsdp (under torchrun)
    device: str = "auto"                    # auto | cpu | cuda
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_last: int = 2
    keep_every: int = 0                     # also keep every checkpoint whose step is a multiple (0 = none)
    loggers: list[str] = field(default_factory=list)   # besides log.jsonl: tensorboard, wandb
    init_from: str | None = None            # start from another run's weights (its latest EMA; or a
                                            # checkpoint dir): step 0, fresh optimizer; not a resume
    sample_every: int = 0                   # 0 = only at the end
    diagnostics_every: int = 0              # 0 = off
    eval_every: int = 0                     # 0 = off; metrics of the EMA weights with the domain network
    eval_n: int = 500                       # samples per evaluation during training
    max_bad_steps: int = 5                  # consecutive non-finite steps before stopping
    divergence_factor: float = 0.0          # stop when the loss exceeds this multiple of its running minimum
                                            # (after 100 steps); 0 = off


@dataclass
class SampleConfig:
    sampler: str = "dpm++2m"                # ddpm | ddim | dpm++2m | euler-a | dpm++2m-sde | dpm++3m-sde | heun | unipc
    steps: int = 50
    spacing: str = "uniform"                # uniform | trailing | leading | karras | logsnr
    eta: float = 0.0                        # ddim: fresh-noise share (0 = deterministic DDIM, 1 = DDPM)
    sde_eta: float = 1.0                    # euler-a, dpm++2m-sde, dpm++3m-sde: fresh-noise share (0 = their ODE)
    variance: str = "auto"                  # ddpm: fixed-small | fixed-large | learned (auto: learned for a
                                            # learned-sigma model, else fixed-small)
    s_churn: float = 0.0                    # heun (EDM): stochastic churn, applied for sigma in [s_tmin, s_tmax]
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    cfg_scale: float = 1.0
    guidance_interval: list[float] | None = None   # [lo, hi]: guide only where lo < sigma <= hi (None: always)
    cfg_rescale: float = 0.0                # CFG rescale phi (Lin et al. 2024; 0 = off, 0.7 there)
    cache_interval: int = 1                 # feature caching: a full network evaluation every N (1 = off)
    precision: str = "fp32"                 # fp32 | bf16 | fp16: autocast of the network while sampling
    compile: bool = False                   # torch.compile the network for sampling (pays off for many batches)
    n: int = 100
    seed: int = 0
    grid_classes: list[int] | None = None   # classes shown in grids (one per column); None: all up to 16
                                            # classes, else 8 spread over the label range


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += valid_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _coerce(value, hint, key: str):
    """Check `value` against the annotation `hint` (int -> float widening allowed)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} expects a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):      # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"config key {key!r} expects true/false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool) and hint is not bool):
        raise ValueError(f"config key {key!r} expects {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def unknown_key_error(key: str) -> ValueError:
    """An unknown key: the nearest valid ones (difflib), and where to find them all."""
    import difflib
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.75)
    hint = f"did you mean {' or '.join(repr(k) for k in close)}? " if close else ""
    return ValueError(f"unknown config key {key!r}; {hint}All keys with their defaults: "
                      f"`nrdm info digits --config --no-flops`, or the README's configuration table")


def from_dict(data: dict, cls=Config, prefix: str = ""):
    """Build a (nested) config dataclass from a dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise unknown_key_error(prefix + str(unknown[0]))
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value or {}, hint, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (value parsed as YAML: 3, 1e-4, true, [1, 2], text)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.steps=500")
        key, raw = item.split("=", 1)
        if key not in valid_keys():
            raise unknown_key_error(key)
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = yaml.safe_load(raw) if raw.strip() else None
    return data


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    return data or {}


def load_config(source: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """source: a preset name, a YAML path, or None for the defaults."""
    data: dict = {}
    if source is not None:
        path = Path(source)
        if not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
            path = PRESET_DIR / f"{source}.yaml"
        if not path.exists():
            raise ValueError(f"no preset or file {str(source)!r}; presets: {', '.join(presets())}")
        data = read_yaml(path)
    return from_dict(apply_overrides(data, list(overrides)))
