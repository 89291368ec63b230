"""Command line: `nrdm train | sample | eval | info`.

    nrdm train digits --out runs/digits [--set train.steps=500]... [--resume]
    nrdm sample runs/digits --n 64 --out grid.png [--sampler dpm++2m --steps 25 --cfg 2 --seed 0 --class 3]
    nrdm eval runs/digits --n 1000 --json metrics.json [--sampler --steps --cfg --seed --ref fashion:test]
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


def _load_run(run_dir: Path, use_ema: bool = True):
    from nrdm.config import from_dict
    from nrdm.factory import build_model_from_config, build_schedule
    from nrdm.training.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"{run_dir} holds no checkpoint (expected {run_dir}/checkpoints/step-XXXXXXXX/)")
    loaded = load_checkpoint(ckpt, weights_only=True)
    cfg = from_dict(yaml.safe_load(loaded["config_yaml"]))
    model = build_model_from_config(cfg)
    model.load_state_dict(loaded["ema" if use_ema else "model"])
    return cfg, model.eval(), build_schedule(cfg), ckpt


def _sample(args) -> int:
    from nrdm.sampling import generate, grid_labels
    from nrdm.utils.images import save_grid

    cfg, model, schedule, ckpt = _load_run(Path(args.run), use_ema=not args.no_ema)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    s = cfg.sample
    sampler = args.sampler or s.sampler
    steps = args.steps or s.steps
    cfg_scale = s.cfg_scale if args.cfg is None else args.cfg
    if args.class_ is not None:
        if not model.num_classes:
            raise ValueError("--class was given but the model is unconditional")
        if not 0 <= args.class_ < model.num_classes:
            raise ValueError(f"--class must lie in [0, {model.num_classes - 1}], got {args.class_}")
        labels = torch.full((args.n,), args.class_, dtype=torch.long)
    else:
        labels = grid_labels(args.n, model.num_classes)
    images = generate(model, schedule, args.n, labels, sampler, steps, cfg_scale, s.eta, args.seed,
                      device=device, progress=True)
    nrow = model.num_classes if (model.num_classes and args.class_ is None) else None
    path = save_grid(images, args.out, nrow=nrow, scale=args.scale or max(1, 64 // model.image_size))
    print(f"wrote {path} ({args.n} samples from {ckpt}, {sampler} {steps} steps, cfg {cfg_scale}, seed {args.seed})")
    return 0


def _eval(args) -> int:
    from nrdm.metrics.evaluate import evaluate, feature_network, format_table

    cfg, model, schedule, ckpt = _load_run(Path(args.run), use_ema=not args.no_ema)
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


def _lab(args) -> int:
    from nrdm.lab.grid import run_grid, toy_grid
    from nrdm.lab.plots import plot_all, summarize, write_csv

    out = Path(args.out)
    cells = toy_grid(args.dataset, args.variants, args.depths, args.gammas, args.seeds, width=args.width,
                     steps=args.steps, batch_size=args.batch_size, lr=args.lr, penalty_units=args.penalty_units)
    records = run_grid(cells, out / "results.jsonl", progress=not args.no_progress,
                       eval_n=args.eval_n, sample_steps=args.sample_steps)
    keys = {c.key for c in cells}
    records = [r for r in records if r["key"] in keys]
    rows = summarize(records)
    write_csv(rows, out / "summary.csv")
    plots = plot_all(records, out / "plots")
    print(f"{'variant':<12}{'depth':>6}{'gamma':>8}{'energy (mean+-std)':>24}{'diverged':>10}")
    for r in rows:
        print(f"{r['variant']:<12}{r['depth']:>6}{r['gamma']:>8g}{r['energy_mean']:>14.4f} +- {r['energy_std']:<7.4f}"
              f"{r['diverged']:>6}/{r['seeds']}")
    print(f"floor (real vs real, n={args.eval_n}): {rows[0]['energy_floor']:.4f}; wrote {out / 'summary.csv'} and "
          f"{len(plots)} plots in {out / 'plots'}")
    return 0


def _info(args) -> int:
    from nrdm.config import load_config
    from nrdm.factory import build_model_from_config, validate
    from nrdm.models import count_flops, count_parameters
    from nrdm.training.checkpoint import latest_checkpoint

    target = Path(args.target)
    info: dict = {}
    if target.is_dir():
        cfg, model, _, ckpt = _load_run(target)
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

    p = sub.add_parser("sample", help="sample an image grid from a run's latest checkpoint")
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"])
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_", type=int, help="sample only this class")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--scale", type=int, help="enlarge the grid by this factor")
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="FID/KID/IS/precision/recall/class accuracy of a run, protocol in JSON")
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=int, default=1000, help="number of generated samples")
    p.add_argument("--json", help="write metrics and protocol to this JSON file")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m"])
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref", help="reference data NAME[:SPLIT] (default: the run's dataset, held-out split)")
    p.add_argument("--feature-net", help="domain (default for digits/mnist/fashion), inception (file from "
                                         "$NRDM_INCEPTION) or a path to the TorchScript Inception file")
    p.add_argument("--domain-epochs", type=int, help="training epochs of a new domain network (default: auto)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_eval)

    p = sub.add_parser("lab", help="depth-scaling lab: a resumable {variant} x {depth} x {gamma} x {seed} grid")
    lab = p.add_subparsers(dest="lab", required=True)
    p = lab.add_parser("toy", help="toy distributions with exact ground truth (energy distance)")
    p.add_argument("--out", required=True, help="grid directory (results.jsonl, summary.csv, plots/)")
    p.add_argument("--dataset", default="gmm2d", choices=["gmm2d", "moons", "gmm16"])
    p.add_argument("--variants", nargs="+", default=["nrdm", "adaln", "scaled-skip", "resnet", "rezero", "adaln-zero"])
    p.add_argument("--depths", nargs="+", type=int, default=[8, 32, 128])
    p.add_argument("--gammas", nargs="+", type=float, default=[0.0, 0.01])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--penalty-units", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_lab)

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

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CheckpointError, TrainingStopped) as err:
        print(f"nrdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
