"""Command line: `nrdm train | sample | eval | latents | autoencoder | lab | plot | import-dit | export | info`.

    nrdm train digits --out runs/digits [--set train.steps=500]... [--resume]
    nrdm sample runs/digits -n 64 --out grid.png [--sampler dpm++2m --steps 25 --cfg 2 --seed 0 --class 3]
    nrdm sample runs/digits -n 50000 --npz samples.npz   (a sample set; torchrun splits it over processes)
    nrdm eval runs/digits -n 1000 --json metrics.json [--sampler --steps --cfg --seed --ref fashion:test]
    nrdm eval --samples samples.npz --ref-stats VIRTUAL_imagenet256_labeled.npz   (ADM's reference batch)
    nrdm latents PRESET [--set data.vae=...]   (extract the latents of data.vae into the cache, in shards)
    nrdm autoencoder fashion --out runs/ae     (train the small autoencoder for offline latent diffusion)
    nrdm lab toy --out runs/lab-toy  /  nrdm lab image --out runs/lab-image   (depth-scaling grids)
    nrdm plot runs/a runs/b --out plots/  (loss, lr, images/s, eval metrics, per-unit sensitivity; overlaid)
    nrdm import-dit DiT-XL-2-256x256.pt --out runs/dit-xl2   (DiT weights as a run: sample, eval, fine-tune)
    nrdm export runs/digits --out exported/digits   (a diffusers folder: NRDMPipeline.from_pretrained)
    nrdm info runs/digits            (or a preset / YAML: validate it and count parameters and FLOPs)

Multi-process: torchrun --nproc_per_node=N -m nrdm.cli train|sample|eval|latents ...  (same arguments;
write -n, not --n, which torchrun reads as its own option)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm


from nrdm.config import DEVICES
from nrdm.factory import load_run, output_kwargs
from nrdm.models.gated_unit import VARIANTS


class _DefaultsHelp(argparse.HelpFormatter):
    """Help that states each flag's default when it has a value and the text does not already."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sample counts, steps, scales)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train(args) -> int:
    from nrdm.config import load_config, from_dict
    from nrdm.training import train
    from nrdm.checkpoint import latest_checkpoint

    out = Path(args.out)
    if args.resume and args.config is None:
        if not (out / "config.yaml").exists():
            raise ValueError(f"--resume without a config needs {out}/config.yaml, which does not exist")
        from nrdm.config import apply_overrides, read_yaml
        cfg = from_dict(apply_overrides(read_yaml(out / "config.yaml"), args.set))
    else:
        if args.config is None:
            raise ValueError("nrdm train needs a preset or YAML file (e.g. `nrdm train digits --out runs/digits`)")
        cfg = load_config(args.config, args.set)
    if args.resume and latest_checkpoint(out) is None:
        print(f"no checkpoint in {out}: starting from scratch", file=sys.stderr)
    summary = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _sample_settings(cfg, args):
    """cfg.sample with the command line's sampling flags applied (cfg is changed and it is returned)."""
    import dataclasses

    flags = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, seed=args.seed, spacing=args.spacing,
                 variance=args.variance,
                 guidance_interval=args.guidance_interval, cfg_rescale=args.cfg_rescale, cache_interval=args.cache_interval,
                 precision=args.precision, compile=True if args.compile else None)
    cfg.sample = dataclasses.replace(cfg.sample, **{k: v for k, v in flags.items() if v is not None})
    return cfg.sample


def _generation_flags(p: argparse.ArgumentParser, default_n: int) -> None:
    """What nrdm sample and nrdm eval share: how many samples, from which weights, in which
    batches, and the sampling flags."""
    p.add_argument("-n", "--n", "--num-samples", dest="n", type=positive_int, default=default_n,
                   help="number of samples, split over the processes under torchrun (there write -n: torchrun "
                        "takes --n for its own --nnodes)")
    p.add_argument("--checkpoint", help="step-N, N or a checkpoint path (default: the latest)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="samples per batch (and per resumable chunk)")
    _sampling_flags(p)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags that override a run's sample settings (nrdm sample and nrdm eval)."""
    from nrdm.diffusion import SAMPLERS, SPACINGS, VARIANCES

    p.add_argument("--sampler", choices=list(SAMPLERS), help="sampler (default: the run's sample.sampler)")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--spacing", choices=SPACINGS, help="step spacing (default: the run's sample.spacing)")
    p.add_argument("--variance", choices=VARIANCES, help="ddpm's step variance; auto = learned for a learned-sigma "
                                                         "model, else fixed-small (default: the run's sample.variance)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale, 1 = none (default: the run's "
                                             "sample.cfg_scale)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only where LO < sigma <= HI, sigma = sqrt((1 - abar) / abar) (default: the run's)")
    p.add_argument("--cfg-rescale", type=float, help="CFG rescale phi in [0, 1] (default: the run's sample.cfg_rescale)")
    p.add_argument("--cache-interval", type=positive_int, help="feature caching: a full network evaluation every N, "
                                                               "the deep features reused between (1 = off; default: "
                                                               "the run's sample.cache_interval)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast of the network while sampling "
                                                                          "(default: the run's sample.precision)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for sampling")


def _sample(args) -> int:
    """A grid (--out), or a sample set (--npz / --png-dir) generated by every process of torchrun."""
    from nrdm.sampling import generate, sample_conditions, save_samples
    from nrdm.training.distributed import barrier, init_distributed

    if not (args.out or args.npz or args.png_dir):
        raise ValueError("say where the samples go: --out GRID.png, --npz FILE.npz and/or --png-dir DIR")
    env = init_distributed(args.device)
    cfg, model, schedule, ckpt = load_run(Path(args.run), use_ema=not args.no_ema, checkpoint=args.checkpoint)
    model.to(env.device)
    s = _sample_settings(cfg, args)
    if args.prompt and not model.text_dim:
        raise ValueError("--prompt needs a text-to-image model (model.text_encoder); this one is "
                         + ("class-conditional: use --class" if model.num_classes else "unconditional"))
    if args.class_ is not None:
        if not model.num_classes:
            raise ValueError("--class was given but the model is not class-conditional"
                             + (" (it takes text: use --prompt)" if model.text_dim else ""))
        if not 0 <= args.class_ < model.num_classes:
            raise ValueError(f"--class must lie in [0, {model.num_classes - 1}], got {args.class_}")
    bulk = bool(args.npz or args.png_dir)
    grid_n = min(args.n, 64) if bulk else args.n            # beside a sample set, the grid shows up to 64

    def conditions(n: int, grid: bool):
        if args.class_ is not None:
            labels = torch.full((n,), args.class_, dtype=torch.long)
            return labels, labels, None
        return sample_conditions(model, cfg, n, args.prompt or None, grid=grid)

    what = f"{args.n} samples from {ckpt} ({'raw' if args.no_ema else 'EMA'} weights), {s.sampler} {s.steps} steps, " \
           f"cfg {s.cfg_scale}, seed {s.seed}"
    run = dict(model=model, schedule=schedule, settings=s, batch_size=args.batch_size, device=env.device,
               **output_kwargs(cfg, env.device))
    if bulk:
        condition, labels, _ = conditions(args.n, grid=False)      # balanced over every class
        _sample_set(args, {**run, "n": args.n, "labels": condition}, labels, env, what)
    if args.out and env.is_main:
        condition, _, nrow = conditions(grid_n, grid=True)
        images = generate(**run, n=grid_n, labels=condition, progress=True)
        paths = save_samples(images, args.out, nrow=nrow, scale=args.scale)
        print(f"wrote {', '.join(map(str, paths))} ({grid_n} samples from {ckpt}, {s.sampler} {s.steps} steps, "
              f"cfg {s.cfg_scale}, seed {s.seed})")
    barrier(env)
    return 0


def _sample_set(args, run: dict, labels, env, what: str) -> None:
    """Every process generates its chunks into FILE.npz.parts/ (and PNGs); a rerun skips chunks on
    disk; rank 0 assembles the .npz."""
    from nrdm.sampling import assemble_npz, chunks, generate_chunks, save_chunk
    from nrdm.training.distributed import barrier

    npz = Path(args.npz) if args.npz else None
    png_dir = Path(args.png_dir) if args.png_dir else None
    parts = npz.with_name(npz.name + ".parts") if npz else Path(args.png_dir) / ".parts"
    done = lambda start, stop: (parts / f"{start:08d}.npy").is_file()
    for start, images in tqdm(generate_chunks(**run, rank=env.rank, world_size=env.world_size, skip=done),
                              desc=f"sample (rank {env.rank})", disable=not env.is_main,
                              total=len(chunks(args.n, args.batch_size, env.rank, env.world_size))):
        save_chunk(images, start, parts, png_dir)
    barrier(env)
    if env.is_main:
        if npz:
            assemble_npz(parts, args.n, npz, labels)
        else:
            import shutil
            shutil.rmtree(parts)
        print(f"wrote {', '.join(str(p) for p in (npz, png_dir) if p)} ({what}, {env.world_size} process(es))")


def _eval(args) -> int:
    """Metrics of a run's samples (generated by every process under torchrun) or of a sample set
    on disk (--samples), against its dataset or a reference statistics file (--ref-stats)."""
    from nrdm.metrics.evaluate import evaluate, feature_network, format_table
    from nrdm.training.distributed import init_distributed

    if args.run is None and not (args.samples and args.ref_stats):
        raise ValueError("nrdm eval needs a run directory, or --samples with --ref-stats")
    env = init_distributed(args.device)
    cfg = model = schedule = None
    extra = {}
    if args.run is not None:
        cfg, model, schedule, ckpt = load_run(Path(args.run), use_ema=not args.no_ema, checkpoint=args.checkpoint)
        model.to(env.device)
        _sample_settings(cfg, args)
        extra = {"checkpoint": str(ckpt), "step": int(ckpt.name.split("-")[1]),
                 "weights": "raw" if args.no_ema else "ema"}
    net = None
    if args.feature_net or cfg is not None:
        data_cfg = cfg.data if cfg is not None else None
        if args.ref and data_cfg is not None:
            from dataclasses import replace
            data_cfg = replace(cfg.data, name=args.ref.partition(":")[0])
        if data_cfg is not None:
            net = feature_network(data_cfg, args.feature_net, args.domain_epochs, device=env.device)
    result = evaluate(model, schedule, cfg, n=args.n, ref=args.ref, net=net, device=env.device, progress=env.is_main,
                      extra_protocol=extra, ref_stats=args.ref_stats, samples=args.samples,
                      batch_size=args.batch_size, distributed=True)
    if not env.is_main:
        return 0
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)
        print(f"wrote {path}")
    return 0


def _latents(args) -> int:
    """Extract the latents of a config's data into the cache, streamed in shards; under torchrun
    every process encodes its share of the shards on its own device."""
    import dataclasses

    from nrdm.config import load_config
    from nrdm.data.registry import build_dataset, held_out_split, pixel_config
    from nrdm.factory import latent_dataset, validate
    from nrdm.training.distributed import init_distributed

    cfg = load_config(args.config, args.set)
    validate(cfg)
    if not cfg.data.vae:
        raise ValueError("nrdm latents needs data.vae (a diffusers AutoencoderKL or an `nrdm autoencoder` directory)")
    env = init_distributed(args.device)
    splits = args.splits or [cfg.data.split] + ([held_out_split(cfg.data)] if held_out_split(cfg.data) else [])
    for split in splits:
        data = dataclasses.replace(cfg.data, split=split)
        pixels = build_dataset(pixel_config(data))
        latents = latent_dataset(data, pixels, env.device, args.batch_size, args.shard_size, progress=env.is_main)
        if env.is_main:
            print(f"{split}: {len(latents)} latents of shape {tuple(latents.manifest['shape'])} from {cfg.data.vae} "
                  f"in {latents.directory}")
    return 0


def _autoencoder(args) -> int:
    """Train the project's small autoencoder on a config's data (for offline latent diffusion)."""
    from nrdm.config import load_config
    from nrdm.data import build_dataset, materialise, pixel_config
    from nrdm.models.autoencoder import SmallAutoencoder

    cfg = load_config(args.config, args.set)
    images = materialise(build_dataset(pixel_config(cfg.data, captions=False, split="train")))[0]
    if images.dim() == 5:                                       # clips: an image autoencoder on their frames
        images = images.transpose(1, 2).flatten(0, 1)           # (N*F, C, H, W)
    ae = SmallAutoencoder(images.shape[1], args.latent_channels, args.width, args.levels)
    stats = ae.fit(images, epochs=args.epochs, progress=not args.no_progress)
    out = ae.save(args.out)
    print(f"wrote {out}: reconstruction MSE {stats['mse']:.4f}, latents {args.latent_channels}x"
          f"{images.shape[-1] // 2 ** args.levels}px; train with --set data.vae={out} "
          f"--set data.latent_channels={args.latent_channels} --set data.vae_downsample={2 ** args.levels}")
    return 0


def _lab(args) -> int:
    from nrdm.lab.grid import load_results, product, run_grid
    from nrdm.lab.compare import format_comparison
    from nrdm.lab.plots import format_rows, plot_all, study_cost, summarize, write_csv

    out = Path(args.out)
    fixed = dict(width=args.width, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 penalty_units=args.penalty_units)
    if args.lab == "toy":
        from nrdm.lab.toy import ToyCell
        cells = product(ToyCell, args.variants, args.depths, args.gammas, args.seeds, dataset=args.dataset, **fixed)
        run_kwargs = dict(eval_n=args.eval_n, sample_steps=args.sample_steps)
    else:
        from nrdm.lab.image import ImageCell
        cells = [cell for backbone in args.backbones for cell in
                 product(ImageCell, args.variants, args.depths, args.gammas, args.seeds, preset=args.preset,
                         backbone=backbone, heads=args.heads, patch_size=args.patch_size,
                                 overrides=tuple(args.set), **fixed)]
        run_kwargs = dict(cells_dir=out / "cells", eval_points=args.eval_points, eval_n=args.eval_n)
    shard = tuple(int(x) for x in args.shard.split("/"))
    if not args.report_only:
        run_grid(cells, out / "results.jsonl", progress=not args.no_progress, shard=shard, **run_kwargs)
    records = load_results(out / "results.jsonl")      # the directory is the study: all its cells
    done = {r["key"] for r in records}
    if not records:
        print(f"no finished cells of this grid in {out / 'results.jsonl'} yet")
        return 0
    rows = summarize(records)
    write_csv(rows, out / "summary.csv")
    (out / "summary.md").write_text(format_rows(rows) + "\n")
    (out / "comparison.md").write_text(format_comparison(records, args.reference))
    plots = plot_all(records, out / "plots")
    print(format_rows(rows))
    print(f"{len(records)} cells in the study ({sum(c.key in done for c in cells)}/{len(cells)} of this command's); floor = {rows[0]['metric']} of real vs real data at the same n. "
          f"Wrote {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'comparison.md'} and {len(plots)} plots in "
          f"{out / 'plots'}")
    print(study_cost(records))
    return 0


def _info(args) -> int:
    from nrdm.config import load_config
    from nrdm.factory import build_model_from_config, validate
    from nrdm.models import count_flops, count_parameters

    target = Path(args.target)
    info: dict = {}
    if target.is_dir():
        cfg, model, _, ckpt = load_run(target)
        info.update(run=str(target), checkpoint=str(ckpt), step=int(ckpt.name.split("-")[1]))
    else:
        cfg = load_config(args.target, args.set)
        validate(cfg)
        with torch.device("meta") if args.no_flops else torch.device("cpu"):
            model = build_model_from_config(cfg)
    info.update(backbone=type(model).__name__, variant=model.unit.variant, params=count_parameters(model),
                input=[model.in_channels, model.image_size, model.image_size], num_classes=model.num_classes)
    if not args.no_flops:
        flops = count_flops(model)
        info.update(gflops_per_sample=flops / 1e9, gmacs_per_sample=flops / 2e9)
    print(yaml.safe_dump({"config": cfg.to_dict()}, sort_keys=False) if args.config else "", end="")
    print(json.dumps(info, indent=2))
    return 0


def _plot(args) -> int:
    from nrdm.training.run_plots import plot_runs
    written = plot_runs(args.runs, args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _import_dit(args) -> int:
    from nrdm.config import load_config
    from nrdm.factory import build_model_from_config, validate
    from nrdm.models.dit_import import load_dit
    from nrdm.checkpoint import latest_checkpoint, save_checkpoint

    out = Path(args.out)
    if latest_checkpoint(out) is not None:
        raise ValueError(f"{out} already holds a run; choose a new --out")
    kwargs, state = load_dit(args.source, args.heads)
    model_keys = {"size": None, "backbone": "flow", "channel_mult": None, "attention_resolution": None,
                  **{k: kwargs[k] for k in ("width", "depth", "heads", "patch_size", "mlp_ratio", "variant",
                                             "gate_source", "learn_sigma", "embeddings")}}
    sets = [f"model.{k}={'null' if v is None else json.dumps(v)}" for k, v in model_keys.items()]
    # DiT's diffusion: linear betas, T = 1000, eps-prediction; a learned variance is trained by the hybrid loss
    sets += ["diffusion.schedule=linear", "diffusion.num_timesteps=1000", "diffusion.prediction=eps",
             f"diffusion.vlb_weight={1.0 if kwargs['learn_sigma'] else 0.0}"]
    cfg = load_config(args.preset, sets + args.set)
    validate(cfg)
    model = build_model_from_config(cfg)
    have = (model.in_channels, model.image_size, model.num_classes)
    want = (kwargs["in_channels"], kwargs["image_size"], kwargs["num_classes"])
    if have != want:
        raise ValueError(f"the checkpoint takes (channels, side, classes) = {want}; the config's data gives {have}: "
                         f"choose a preset (or --set data.*) whose (latent) data has that shape")
    model.load_state_dict(state)
    save_checkpoint(out, 0, state, state, {"step": 0, "imported_from": str(args.source)}, cfg.to_yaml(), keep_last=1,
                    model_args=model.build_args)
    print(f"imported {args.source} ({sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters, "
          f"learn_sigma={kwargs['learn_sigma']}) into {out}: nrdm sample {out} / nrdm eval {out}")
    return 0


def _export(args) -> int:
    from nrdm.pipelines.diffusers_pipeline import export_run

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new --out")
    export_run(args.run, out, args.checkpoint)
    print(f"exported {args.run} to {out}: NRDMPipeline.from_pretrained({str(out)!r}) "
          f"(from nrdm.pipelines.diffusers_pipeline)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nrdm", description="Neural Residual Diffusion Models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a preset or YAML config")
    p.add_argument("config", nargs="?", help="preset name (digits, fashion, ...) or YAML path; "
                                             "optional with --resume (the run's config.yaml is used)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, samples/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="sample an image grid (or clips) from a run's latest checkpoint",
                       formatter_class=_DefaultsHelp)
    p.add_argument("run", help="run directory")
    _generation_flags(p, default_n=64)
    p.add_argument("--out", help="grid file: a PNG grid for images; for video models its stem names <stem>.gif, "
                                 "<stem>.mp4 and <stem>-frames.png (with --npz/--png-dir: of the first 256)")
    p.add_argument("--npz", help="write all n samples as an ADM-style .npz (arr_0 uint8 NHWC, arr_1 labels); "
                                 "under torchrun the processes split the work, the file is the same for any count")
    p.add_argument("--png-dir", help="write all n samples as numbered PNG files into this folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of stochastic samplers")
    p.add_argument("--class", dest="class_", type=int, help="class-conditional models: sample only this class "
                                                            "(default: classes 0..K-1, one per grid column)")
    p.add_argument("--prompt", action="append", default=[], help="text-to-image: a caption; repeat for several "
                                                                  "(cycled over the samples, one per grid column)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available")
    p.add_argument("--scale", type=positive_int, help="enlarge the grid by this integer factor (default: none)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="FID/KID/IS/precision/recall/class accuracy of a run, protocol in JSON",
                       formatter_class=_DefaultsHelp)
    p.add_argument("run", nargs="?", help="run directory (optional with --samples and --ref-stats)")
    _generation_flags(p, default_n=1000)
    p.add_argument("--json", help="also write metrics and protocol to this JSON file")
    p.add_argument("--samples", help="evaluate this sample set instead of generating: an .npz (arr_0 uint8 NHWC, "
                                     "as `nrdm sample --npz` and ADM write) or a folder of images")
    p.add_argument("--ref-stats", help="reference statistics file instead of the dataset: an ADM reference batch "
                                       "(e.g. VIRTUAL_imagenet256_labeled.npz) or an .npz with mu and sigma")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    p.add_argument("--ref", help="reference data NAME[:SPLIT] (default: the run's dataset, held-out split)")
    p.add_argument("--feature-net", help="domain (default for digits/mnist/fashion/moving-digits), inception / i3d "
                                         "(file from $NRDM_INCEPTION / $NRDM_I3D) or a path to such a TorchScript file")
    p.add_argument("--domain-epochs", type=positive_int, help="training epochs of a new domain network (default: auto)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available")
    p.set_defaults(func=_eval)

    p = sub.add_parser("latents", help="pre-extract the latents of a config's data (data.vae) into the cache",
                       formatter_class=_DefaultsHelp)
    p.add_argument("config", help="preset or YAML with data.vae set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--splits", nargs="+", help="splits to extract (default: data.split, and the held-out split "
                                               "of datasets that have one)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available "
                                                                                     "(torchrun: one GPU per process)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch")
    p.add_argument("--shard-size", type=positive_int, default=16384, help="images per shard file (the unit of "
                                                                          "resuming and of splitting over processes)")
    p.set_defaults(func=_latents)

    p = sub.add_parser("autoencoder", help="train a small autoencoder on a config's data (offline latent diffusion)")
    p.add_argument("config", help="preset or YAML whose data to use")
    p.add_argument("--out", required=True, help="directory for autoencoder.json / .safetensors")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--levels", type=int, default=2, help="stride-2 stages (downsampling 2^levels)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_autoencoder)

    p = sub.add_parser("lab", help="depth-scaling lab: a resumable {variant} x {depth} x {gamma} x {seed} grid")
    lab = p.add_subparsers(dest="lab", required=True)
    toy = lab.add_parser("toy", help="toy distributions with exact ground truth (energy distance)")
    toy.add_argument("--dataset", default="gmm2d", choices=["gmm2d", "moons", "gmm16"])
    image = lab.add_parser("image", help="digits / Fashion-MNIST with narrow flow- or U-shaped transformers (FID)")
    image.add_argument("--preset", default="digits", help="data and diffusion settings (digits | fashion | YAML)")
    image.add_argument("--backbones", nargs="+", default=["flow"], choices=["flow", "u-transformer", "preset"],
                       help="narrow transformers of --width/--heads/--patch-size, or `preset`: the preset's own model "
                            "and training recipe with only its variant and depth changed")
    image.add_argument("--heads", type=int, default=4)
    image.add_argument("--patch-size", type=int, default=4)
    image.add_argument("--eval-points", type=int, default=3, help="FID evaluations per cell (the last at the end)")
    image.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="change a preset key, e.g. --set data.image_size=8 (model and train keys come from the lab)")
    # the defaults are the reduced grids (about 15 minutes each on 2 CPU cores); the full study of
    # docs/depth-study.md is benchmarks/depth_study.sh
    for q, defaults in ((toy, dict(depths=[8, 64], gammas=[0.0, 0.01], width=32, steps=120, batch_size=128,
                                   eval_n=1000)),
                        (image, dict(depths=[4, 16], gammas=[0.0], width=64, steps=300, batch_size=64, eval_n=250))):
        q.add_argument("--out", required=True, help="grid directory (results.jsonl, summary.csv/.md, plots/)")
        q.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                       help="residual forms to compare (default: all)")
        q.add_argument("--depths", nargs="+", type=int, default=defaults["depths"])
        q.add_argument("--gammas", nargs="+", type=float, default=defaults["gammas"])
        q.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2] if q is toy else [0])
        q.add_argument("--width", type=int, default=defaults["width"])
        q.add_argument("--steps", type=int, default=defaults["steps"], help="training steps per cell")
        q.add_argument("--batch-size", type=int, default=defaults["batch_size"])
        q.add_argument("--lr", type=float, default=1e-3)
        q.add_argument("--penalty-units", type=int, default=1, help="units per step at which the penalty is evaluated")
        q.add_argument("--eval-n", type=int, default=defaults["eval_n"], help="samples per quality evaluation")
        q.add_argument("--shard", default="0/1", help="I/N: run every N-th cell from the I-th (N processes, one grid)")
        q.add_argument("--report-only", action="store_true", help="only summarise and plot the finished cells")
        q.add_argument("--reference", default="adaln-zero", choices=VARIANTS,
                       help="the form every other is compared with, seed by seed, in comparison.md")
        q.add_argument("--no-progress", action="store_true")
        q.set_defaults(func=_lab)
    toy.add_argument("--sample-steps", type=int, default=20)

    p = sub.add_parser("plot", help="loss, learning rate, throughput, eval metrics and per-unit sensitivity of "
                                     "runs as PNGs, overlaid")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.set_defaults(func=_plot)

    p = sub.add_parser("import-dit", help="a DiT checkpoint (official .pt or diffusers folder) as a run directory")
    p.add_argument("source", help="DiT .pt / .safetensors file, or a diffusers DiTTransformer2DModel folder")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--preset", default="dit-xl2-imagenet256", help="data, diffusion and sampling settings "
                   "(default: dit-xl2-imagenet256, SD-VAE latents of 256 px ImageNet)")
    p.add_argument("--heads", type=int, help="attention heads (default: DiT's for the width)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_import_dit)

    p = sub.add_parser("export", help="a run as a diffusers folder (NRDMPipeline.from_pretrained, push_to_hub)")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", required=True, help="new folder: model/, scheduler/, vae/ (latent runs), model_index.json")
    p.add_argument("--checkpoint", help="step-N, N or a checkpoint path (default: the latest; its EMA weights)")
    p.set_defaults(func=_export)

    p = sub.add_parser("info", help="config, parameters, FLOPs and step of a run (or of a preset/YAML)")
    p.add_argument("target", help="run directory, preset name or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--config", action="store_true", help="also print the full configuration")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting (builds on the meta device)")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nrdm.training import CheckpointError, TrainingStopped
    from nrdm.utils.optional import MissingDependency

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CheckpointError, TrainingStopped, MissingDependency) as err:
        print(f"nrdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
