"""Latent vs pixel diffusion on Fashion-MNIST at equal model size, measured side by side.

The same backbone trains on 32x32x1 pixels and on the 8x8xC latents of an autoencoder with
downsampling 4 (the project's own, from `nrdm autoencoder`, or any diffusers AutoencoderKL):
- unet: the Fashion preset's conv U-Net (UNet-T widths, levels 1-2-2), attention only at its
  lowest level in both, so the two differ only in their input/output convolutions;
- flow: a flow transformer, width 128, depth 6; patch 4 on pixels and patch 1 on latents, so both
  see the same 64 tokens.

It prints, per backbone, both models' parameters, training steps/s (the real trainer, median of
interleaved rounds) and their ratio; the one-time cost of extracting the latents of the training
split; and the sampling time per image (latent: including decoding). With --minutes M, both
models also train for M minutes each and are scored by FID (domain network) at --n samples.

    nrdm autoencoder fashion --out runs/ae-fashion --set data.image_size=32      # once
    python benchmarks/latent_vs_pixel.py --ae runs/ae-fashion [--backbones unet flow] [--minutes 0]
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from _throughput import timing_overrides, trainer_steps_per_s
from nrdm.config import load_config
from nrdm.data import build_dataset, data_shape
from nrdm.factory import latent_dataset
from nrdm.factory import build_model_from_config, load_run, output_kwargs
from nrdm.metrics.evaluate import evaluate
from nrdm.models.autoencoder import build_codec
from nrdm.sampling import generate
from nrdm.training import train

FLOW = ["model.size=null", "model.backbone=flow", "model.width=128", "model.depth=6", "model.heads=4",
        "model.channel_mult=null", "model.attention_resolution=null"]
BACKBONES = {   # (pixel overrides, latent overrides) of the Fashion preset at 32x32 pixels / 8x8 latents
    "unet": (["model.attention_resolution=8"], ["model.attention_resolution=2"]),   # lowest level only
    "flow": ([*FLOW, "model.patch_size=4"], [*FLOW, "model.patch_size=1"]),         # 64 tokens each
}


def overrides(backbone: str, ae: str, image_size: int, extra: list[str]) -> dict[str, list[str]]:
    """{"pixel": [...], "latent": [...]}: the --set overrides of the Fashion preset for one backbone."""
    codec = build_codec(ae)
    latent = [f"data.vae={ae}", f"data.latent_channels={codec.latent_channels}",
              f"data.vae_downsample={codec.downsample}"]
    pixel_set, latent_set = BACKBONES[backbone]
    base = [f"data.image_size={image_size}", *extra]
    return {"pixel": [*base, *pixel_set], "latent": [*base, *latent, *latent_set]}


def params(cfg) -> int:
    return sum(p.numel() for p in build_model_from_config(cfg).parameters())


def sampling_seconds_per_image(run_dir: Path, n: int) -> float:
    """Wall time per image of the preset's sampler (25 DPM-Solver++ steps with guidance), decoding
    included for latent models."""
    cfg, model, schedule, _ = load_run(run_dir)
    start = time.perf_counter()
    generate(model, schedule, n, torch.arange(n) % 10, cfg.sample, **output_kwargs(cfg))
    return (time.perf_counter() - start) / n


def extraction_seconds(cfg) -> tuple[float, int]:
    """One-time cost of encoding the training split and writing the latent cache (into an empty
    cache directory): (seconds, images)."""
    pixels = build_dataset(replace(cfg.data, vae=None))
    saved = os.environ.get("NRDM_CACHE")
    with tempfile.TemporaryDirectory() as empty_cache:
        os.environ["NRDM_CACHE"] = empty_cache
        try:
            start = time.perf_counter()
            latent_dataset(cfg.data, pixels)
            seconds = time.perf_counter() - start
        finally:
            os.environ.pop("NRDM_CACHE") if saved is None else os.environ.update(NRDM_CACHE=saved)
    return seconds, len(pixels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ae", required=True, help="autoencoder directory (nrdm autoencoder) or diffusers VAE")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=0.0, help="also train each model this long and score FID")
    parser.add_argument("--n", type=int, default=1000, help="samples for FID (with --minutes)")
    parser.add_argument("--out", help="keep the --minutes runs here (default: a temporary directory)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every model")
    args = parser.parse_args()

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sets = {b: overrides(b, args.ae, args.image_size, args.set) for b in args.backbones}
        cfgs = {b: {kind: load_config("fashion", s) for kind, s in pair.items()} for b, pair in sets.items()}
        for r in range(args.rounds):                                     # interleaved rounds
            for backbone, pair in sets.items():
                for kind, kind_sets in pair.items():
                    timed = load_config("fashion", [*kind_sets, *timing_overrides(args.steps)])
                    run = work / f"timing-{backbone}-{kind}-{r}"
                    results.setdefault((backbone, kind), {}).setdefault("sps", []).append(
                        trainer_steps_per_s(timed, run))
                    results[(backbone, kind)]["run"] = run
        for (backbone, kind), res in results.items():
            res["params"] = params(cfgs[backbone][kind])
            res["sample_s"] = sampling_seconds_per_image(res["run"], 20)
        seconds, count = extraction_seconds(next(iter(cfgs.values()))["latent"])
        if args.minutes:
            for (backbone, kind), res in results.items():
                cfg = cfgs[backbone][kind]
                steps = int(args.minutes * 60 * statistics.median(res["sps"]))
                cfg = replace(cfg, train=replace(cfg.train, steps=steps, ckpt_every=steps, sample_every=0))
                run = work / f"{backbone}-{kind}-{args.minutes:g}min"
                train(cfg, run, progress=True)
                _, model, schedule, _ = load_run(run)
                metrics = evaluate(model, schedule, cfg, n=args.n)["metrics"]
                res.update(steps=steps, fid=metrics["fid"], class_accuracy=metrics.get("class_accuracy"))

    print(f"Fashion-MNIST {args.image_size}px; autoencoder {args.ae}; latent extraction of {count} training "
          f"images: {seconds:.1f} s once ({1000 * seconds / count:.2f} ms/image)")
    header = f"{'backbone':<8} {'input':<14} {'params':>9} {'steps/s':>8} {'speed-up':>8} {'sample s/img':>12}"
    if args.minutes:
        header += f" {'steps in ' + format(args.minutes, 'g') + ' min':>16} {'FID':>7} {'class acc':>9}"
    print(header)
    for backbone, pair in cfgs.items():
        base = statistics.median(results[(backbone, "pixel")]["sps"])
        for kind, cfg in pair.items():
            res = results[(backbone, kind)]
            channels, size, _ = data_shape(cfg.data)
            sps = statistics.median(res["sps"])
            row = (f"{backbone:<8} {f'{kind} {channels}x{size}x{size}':<14} {res['params']:>9,} {sps:>8.2f} "
                   f"{sps / base:>7.2f}x {res['sample_s']:>12.3f}")
            if args.minutes:
                row += f" {res['steps']:>16} {res['fid']:>7.2f} {res['class_accuracy'] or 0:>9.3f}"
            print(row)
    print(json.dumps({f"{b}/{k}": {key: v for key, v in res.items() if key != "run"}
                      for (b, k), res in results.items()}))


if __name__ == "__main__":
    main()
