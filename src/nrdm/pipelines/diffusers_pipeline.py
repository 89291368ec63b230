"""Neural-RDM models as diffusers components: export a run, load it with `from_pretrained`, sample it
with any diffusers scheduler.

    nrdm export runs/digits --out exported/digits
    pipe = NRDMPipeline.from_pretrained("exported/digits")        # no nrdm run directory needed
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=25, guidance_scale=3.0).images

A folder holds `model/` (NRDMModel: config.json with build_model's arguments +
diffusion_pytorch_model.safetensors, the run's EMA weights), `scheduler/` (the diffusers scheduler
of the run's sampler, with the run's betas, prediction type and step spacing), `vae/` for runs on
a diffusers AutoencoderKL's latents, and model_index.json. `pipe.push_to_hub(repo)` uploads it.

Guidance is the project's (nrdm.diffusion.guidance): the prediction channels are guided, a learned
variance is taken from the conditional pass. Schedulers whose `step` splits a learned variance off
the output (DDPMScheduler with variance_type learned/learned_range) get all 2C channels; every other
scheduler gets the C prediction channels.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from nrdm.utils.optional import require

diffusers = require("diffusers", "exporting to (and sampling with) diffusers")
from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin  # noqa: E402  (after the check above)
from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput  # noqa: E402
from diffusers.utils import BaseOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from nrdm.diffusion.guidance import in_guidance_interval, model_prediction  # noqa: E402
from nrdm.factory import build_model_from_args  # noqa: E402

# the diffusers scheduler that runs each of our samplers (the same update rule)
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": True}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "final_sigmas_type": "zero"}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                    "final_sigmas_type": "zero"}),
    "dpm++3m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                                    "final_sigmas_type": "zero"}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "final_sigmas_type": "zero"}),
}
DDPM_VARIANCES = {"fixed-small": "fixed_small", "fixed-large": "fixed_large", "learned": "learned_range"}


@dataclass
class NRDMModelOutput(BaseOutput):
    sample: torch.Tensor            # (B, C or 2C, ...): the network's output (eps or v, then the variance values)


class NRDMModel(ModelMixin, ConfigMixin):
    """A neural-rdm backbone as a diffusers model. config.json holds `size` and `backbone_kwargs`,
    the model's build arguments (a checkpoint's model.json), so `from_pretrained` rebuilds it with
    nothing else."""

    @register_to_config
    def __init__(self, size: str | None = None, backbone_kwargs: dict | None = None):
        super().__init__()
        self.backbone = build_model_from_args({"size": size, **(backbone_kwargs or {})})

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None,
                return_dict: bool = True):
        """sample (B, C, H, W) or (B, C, F, H, W); timestep a number or (B,); class_labels (B,)
        indices (index num_classes: no class) or None for an unconditional model."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])     # (B,)
        out = self.backbone(sample, t, class_labels)
        return NRDMModelOutput(sample=out) if return_dict else (out,)


def _guided_at(scheduler, t: torch.Tensor, interval: tuple[float, float] | None) -> bool:
    """Whether step t (rounded: some schedulers step between integers) lies in the guidance interval."""
    abar = scheduler.alphas_cumprod[int(round(float(t)))]
    return bool(in_guidance_interval(((1 - abar) / abar).sqrt(), interval))


def _splits_learned_variance(scheduler) -> bool:
    return isinstance(scheduler, diffusers.DDPMScheduler) and \
        scheduler.config.get("variance_type") in ("learned", "learned_range")


class NRDMPipeline(DiffusionPipeline):
    """Class-conditional or unconditional sampling of an NRDMModel with any diffusers scheduler;
    latent models decode with their `vae` (a diffusers AutoencoderKL)."""

    model_cpu_offload_seq = "model->vae"
    _optional_components = ["vae"]

    def __init__(self, model: NRDMModel, scheduler, vae=None):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler, vae=vae)

    @torch.no_grad()
    def __call__(self, class_labels: list[int] | torch.Tensor | None = None, batch_size: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0,
                 guidance_interval: tuple[float, float] | None = None, guidance_rescale: float = 0.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """class_labels: one class per sample (None: unconditional sampling, `batch_size` samples).
        guidance_scale: classifier-free guidance (1 = none). guidance_interval: (lo, hi), guide only
        at steps whose sigma = sqrt((1 - abar_t) / abar_t) lies in (lo, hi], one conditional pass
        elsewhere (as `sample.guidance_interval`; None: every step). guidance_rescale: CFG rescale
        phi (as `sample.cfg_rescale`). generator: the initial noise and the
        scheduler's noise. latents: the initial noise (B, *sample_shape) instead of drawing it.
        output_type: "pil" (images), "np" (B, H, W, C) or (B, F, H, W, C) in [0, 1], "pt", or
        "latent" (the sampled latents, undecoded)."""
        backbone = self.model.backbone
        scheduler = self.scheduler
        if scheduler.config.get("variance_type") in ("learned", "learned_range") and not _splits_learned_variance(scheduler):
            raise ValueError(f"{type(scheduler).__name__} with variance_type={scheduler.config.variance_type!r} "
                             f"keeps the first 3 channels of the output; make it with variance_type=None: "
                             f"{type(scheduler).__name__}.from_config(pipe.scheduler.config, variance_type=None)")
        device = self._execution_device
        labels = None if class_labels is None else torch.as_tensor(class_labels, device=device).reshape(-1)
        batch = len(labels) if labels is not None else (batch_size or 1)
        if latents is None:
            latents = randn_tensor((batch, *backbone.sample_shape), generator=generator, device=device,
                                   dtype=self.model.dtype)
        x = latents.to(device) * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in self.progress_bar(scheduler.timesteps):
            x_in = scheduler.scale_model_input(x, t)
            scale = guidance_scale if _guided_at(scheduler, t, guidance_interval) else 1.0
            prediction, variance = model_prediction(backbone, x_in, t.expand(batch), labels, scale, guidance_rescale)
            if variance is not None and _splits_learned_variance(scheduler):
                prediction = torch.cat([prediction, variance], 1)
            x = scheduler.step(prediction, t, x, **step_kwargs).prev_sample
        images = x if output_type == "latent" else self._decode(x)
        if output_type == "np":
            images = images.movedim(1, -1).cpu().float().numpy()
        elif output_type == "pil":
            if images.ndim != 4:
                raise ValueError("output_type 'pil' is for images; take clips with output_type 'np' or 'pt'")
            images = self.numpy_to_pil(images.movedim(1, -1).cpu().float().numpy())
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in [0, 1]: pixels of a pixel model; a latent model's latents through the VAE
        (z / scaling_factor + shift_factor), clips frame by frame."""
        if self.vae is not None:
            config = self.vae.config
            frames = x.ndim == 5
            z = x.movedim(2, 1).flatten(0, 1) if frames else x                  # (B F, C, h, w)
            z = z / config.scaling_factor + (config.get("shift_factor") or 0.0)
            pixels = self.vae.decode(z.to(self.vae.dtype)).sample
            x = pixels.unflatten(0, (x.shape[0], x.shape[2])).movedim(1, 2) if frames else pixels
        return (x.float() / 2 + 0.5).clamp(0, 1)


def scheduler_from_config(cfg, variance: str):
    """The diffusers scheduler of a run's sampler with its schedule, prediction and spacing."""
    d, s = cfg.diffusion, cfg.sample
    name, extra = SCHEDULERS[s.sampler]
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    options = dict(num_train_timesteps=d.num_timesteps,
                   prediction_type={"eps": "epsilon", "v": "v_prediction"}[d.prediction], **extra)
    if d.schedule == "linear":          # DDPM's betas scaled to T, as VPSchedule
        options.update(beta_schedule="linear", beta_start=0.1 / d.num_timesteps, beta_end=20.0 / d.num_timesteps)
    else:                               # improved DDPM's cosine, betas clipped at 0.999: diffusers' squaredcos_cap_v2
        options.update(beta_schedule="squaredcos_cap_v2")
    options["timestep_spacing"] = "leading" if s.spacing == "leading" else "trailing"
    if s.spacing == "karras" and "use_karras_sigmas" in accepted:
        options.update(use_karras_sigmas=True)
    if s.spacing == "logsnr" and "use_lu_lambdas" in accepted:
        options.update(use_lu_lambdas=True)
    if s.sampler == "ddpm":
        options["variance_type"] = DDPM_VARIANCES[variance]
    if "clip_sample" in accepted:       # our samplers clamp x0 to [-1, 1] for pixel models
        options["clip_sample"] = not cfg.data.vae
    return cls(**{k: v for k, v in options.items() if k in accepted})


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | None = None) -> Path:
    """Write a run's EMA weights, scheduler and (latent runs) VAE as a diffusers folder at `out`."""
    from nrdm.factory import latent_codec, load_run
    from nrdm.models.autoencoder import DiffusersVAE
    from nrdm.sampling import resolve_variance

    cfg, model, _, _ = load_run(run_dir, checkpoint=checkpoint)
    if cfg.model.text_encoder:
        raise ValueError("text-conditioned runs do not export yet: NRDMPipeline takes class labels; the text "
                         "encoder and caption embeddings are not part of the pipeline")
    vae = None
    if cfg.data.vae:
        codec = latent_codec(cfg.data)
        if not isinstance(codec, DiffusersVAE):
            raise ValueError(f"{cfg.data.vae} is the project's own autoencoder; a diffusers folder needs a diffusers "
                             f"AutoencoderKL (export runs on pixels or on an SD-VAE's latents)")
        vae = codec.vae
    args = dict(model.build_args)
    exported = NRDMModel(size=args.pop("size"), backbone_kwargs=args)
    exported.backbone.load_state_dict(model.state_dict())
    scheduler = scheduler_from_config(cfg, resolve_variance(model, cfg.sample.variance))
    out = Path(out)
    NRDMPipeline(model=exported, scheduler=scheduler, vae=vae).save_pretrained(out)
    return out
