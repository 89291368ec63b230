"""Command line: `nrdm train | sample | eval | latents | autoencoder | lab | info`.

    nrdm train digits --out runs/digits [--set train.steps=500]... [--resume]
    nrdm sample runs/digits --n 64 --out grid.png [--sampler dpm++2m --steps 25 --cfg 2 --seed 0 --class 3]
    nrdm eval runs/digits --n 1000 --json metrics.json [--sampler --steps --cfg --seed --ref fashion:test]
    nrdm latents PRESET [--set data.vae=...]   (pre-extract the latents of data.vae into the cache)
    nrdm autoencoder fashion --out runs/ae     (train the small autoencoder for offline latent diffusion)
    nrdm lab toy --out runs/lab-toy  /  nrdm lab image --out runs/lab-image   (depth-scaling grids)
    nrdm info runs/digits            (or a preset / YAML: validate it and count parameters and FLOPs)

Multi-process: torchrun --nproc_per_node=N -m nrdm.cli train ...  (same arguments)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import yaml


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
    from nrdm.training.checkpoint import latest_checkpoint

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


def _sample(args) -> int:
    from nrdm.sampling import generate, sample_conditions, save_samples

    cfg, model, schedule, ckpt = load_run(Path(args.run), use_ema=not args.no_ema)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    s = cfg.sample
    sampler = args.sampler or s.sampler
    steps = args.steps or s.steps
    cfg_scale = s.cfg_scale if args.cfg is None else args.cfg
    if args.prompt and not model.text_dim:
        raise ValueError("--prompt needs a text-to-image model (model.text_encoder); this one is "
                         + ("class-conditional: use --class" if model.num_classes else "unconditional"))
    nrow = None
    if args.class_ is not None:
        if not model.num_classes:
            raise ValueError("--class was given but the model is not class-conditional"
                             + (" (it takes text: use --prompt)" if model.text_dim else ""))
        if not 0 <= args.class_ < model.num_classes:
            raise ValueError(f"--class must lie in [0, {model.num_classes - 1}], got {args.class_}")
        labels = torch.full((args.n,), args.class_, dtype=torch.long)
    else:
        labels, _, nrow = sample_conditions(model, cfg, args.n, args.prompt or None)
    images = generate(model, schedule, args.n, labels, sampler, steps, cfg_scale, s.eta, args.seed,
                      device=device, progress=True, **output_kwargs(cfg))
    paths = save_samples(images, args.out, nrow=nrow, scale=args.scale)
    print(f"wrote {', '.join(map(str, paths))} ({args.n} samples from {ckpt}, {sampler} {steps} steps, cfg {cfg_scale}, seed {args.seed})")
    return 0


def _eval(args) -> int:
    from nrdm.metrics.evaluate import evaluate, feature_network, format_table

    cfg, model, schedule, ckpt = load_run(Path(args.run), use_ema=not args.no_ema)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    data_cfg = cfg.data
    if args.ref:
        from dataclasses import replace
        data_cfg = replace(cfg.data, name=args.ref.partition(":")[0])
    net = feature_network(data_cfg, args.feature_net, args.domain_epochs)
    result = evaluate(model, schedule, cfg, n=args.n, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg,
                      seed=args.seed, ref=args.ref, net=net, device=device,
                      extra_protocol={"checkpoint": str(ckpt), "step": int(ckpt.name.split("-")[1]),
                                      "weights": "raw" if args.no_ema else "ema"})
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
    """Pre-extract the latents of a config's data (train and held-out split) into the cache."""
    import dataclasses

    from nrdm.config import load_config
    from nrdm.factory import build_dataset

    cfg = load_config(args.config, args.set)
    if not cfg.data.vae:
        raise ValueError("nrdm latents needs data.vae (a diffusers AutoencoderKL or an `nrdm autoencoder` directory)")
    for split in args.splits:
        data = build_dataset(dataclasses.replace(cfg.data, split=split))
        print(f"{split}: {len(data)} latents of shape {tuple(data.images.shape[1:])} from {cfg.data.vae}")
    return 0


def _autoencoder(args) -> int:
    """Train the project's small autoencoder on a config's data (for offline latent diffusion)."""
    import dataclasses

    from nrdm.config import load_config
    from nrdm.data import build_dataset
    from nrdm.models.autoencoder import SmallAutoencoder

    cfg = load_config(args.config, args.set)
    data = build_dataset(dataclasses.replace(cfg.data, vae=None, captions=False, split="train"))
    images = data.batch(torch.arange(len(data)))[0] if hasattr(data, "batch") else torch.stack(
        [data[i][0] for i in range(len(data))])
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
    from nrdm.lab.plots import format_rows, plot_all, summarize, write_csv

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
    plots = plot_all(records, out / "plots")
    print(format_rows(rows))
    print(f"{len(records)} cells in the study ({sum(c.key in done for c in cells)}/{len(cells)} of this command's); floor = {rows[0]['metric']} of real vs real data at the same n. "
          f"Wrote {out / 'summary.csv'}, {out / 'summary.md'} and {len(plots)} plots in {out / 'plots'}")
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

    samplers = ["ddpm", "ddim", "dpm++2m"]
    p = sub.add_parser("sample", help="sample an image grid (or clips) from a run's latest checkpoint",
                       formatter_class=_DefaultsHelp)
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples")
    p.add_argument("--out", required=True, help="output file: a PNG grid for images; for video models its stem "
                                                "names <stem>.gif, <stem>.mp4 and <stem>-frames.png")
    p.add_argument("--sampler", choices=samplers, help="sampler (default: the run's sample.sampler)")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale, 1 = none (default: the run's "
                                             "sample.cfg_scale)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and of stochastic samplers")
    p.add_argument("--class", dest="class_", type=int, help="class-conditional models: sample only this class "
                                                            "(default: classes 0..K-1, one per grid column)")
    p.add_argument("--prompt", action="append", default=[], help="text-to-image: a caption; repeat for several "
                                                                  "(cycled over the samples, one per grid column)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when available")
    p.add_argument("--scale", type=positive_int, help="enlarge the grid by this integer factor (default: none)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="FID/KID/IS/precision/recall/class accuracy of a run, protocol in JSON",
                       formatter_class=_DefaultsHelp)
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=positive_int, default=1000, help="number of generated samples")
    p.add_argument("--json", help="also write metrics and protocol to this JSON file")
    p.add_argument("--sampler", choices=samplers, help="sampler (default: the run's sample.sampler)")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale, 1 = none (default: the run's "
                                             "sample.cfg_scale)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    p.add_argument("--ref", help="reference data NAME[:SPLIT] (default: the run's dataset, held-out split)")
    p.add_argument("--feature-net", help="domain (default for digits/mnist/fashion/moving-digits), inception / i3d "
                                         "(file from $NRDM_INCEPTION / $NRDM_I3D) or a path to such a TorchScript file")
    p.add_argument("--domain-epochs", type=positive_int, help="training epochs of a new domain network (default: auto)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda when available")
    p.set_defaults(func=_eval)

    p = sub.add_parser("latents", help="pre-extract the latents of a config's data (data.vae) into the cache")
    p.add_argument("config", help="preset or YAML with data.vae set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--splits", nargs="+", default=["train", "test"])
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
        q.add_argument("--no-progress", action="store_true")
        q.set_defaults(func=_lab)
    toy.add_argument("--sample-steps", type=int, default=20)

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
