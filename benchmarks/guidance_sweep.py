"""Guidance scale against quality, for several trained runs side by side.

Each run is scored at each guidance scale with `nrdm.metrics.evaluate` (FID and class accuracy on
the run's feature network; the same n, noise seed, sampler and classes for every run and scale),
and the rows are appended to OUT/guidance.jsonl (a rerun skips what is there). Runs of one dataset
are what this compares: the residual forms of the depth study, say. It then plots FID against the
scale and FID against class accuracy, the trade-off that each run traces as guidance grows
(OUT/guidance.png, with the real-vs-real FID at the same n), and prints per run:
- its best FID and the scale that gives it;
- its FID at the highest class accuracy that every run reaches, interpolated linearly between
  neighbouring scales. Stronger guidance buys class accuracy with FID, so two runs compared at one
  scale can rank by how strongly they follow the class rather than by how well they model the data.

    python benchmarks/guidance_sweep.py RUN [RUN ...] --out runs/guidance --cfg 1 1.5 2 3
        [--labels nrdm adaln-zero resnet] [--n 500] [--seed 0] [--sampler dpm++2m --steps 25 --spacing uniform]
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nrdm.diffusion import SAMPLERS, SPACINGS  # noqa: E402
from nrdm.factory import load_run  # noqa: E402
from nrdm.metrics.evaluate import evaluate, feature_network  # noqa: E402
from sampler_sweep import floor_of  # noqa: E402  (benchmarks/ is the script's directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cfg", nargs="+", type=float, required=True, help="guidance scales")
    parser.add_argument("--labels", nargs="+", help="one name per run (default: the run directories' names)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="dpm++2m", choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--spacing", default="uniform", choices=SPACINGS)
    args = parser.parse_args()
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels needs one name per run: {len(args.runs)} runs, {len(labels)} labels")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "guidance.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["label"], r["cfg_scale"]) for r in rows}
    protocol = dict(sampler=args.sampler, steps=args.steps, spacing=args.spacing, n=args.n, seed=args.seed)
    net = None
    for run, label in zip(args.runs, labels):
        todo = [scale for scale in args.cfg if (label, scale) not in done]
        if not todo:
            continue
        cfg, model, schedule, ckpt = load_run(run)
        net = net or feature_network(cfg.data, progress=False)
        for scale in todo:
            cfg.sample = dataclasses.replace(cfg.sample, seed=args.seed, sampler=args.sampler, steps=args.steps,
                                             spacing=args.spacing, cfg_scale=scale, guidance_interval=None,
                                             cache_interval=1, precision="fp32", compile=False)
            start = time.perf_counter()
            metrics = evaluate(model, schedule, cfg, n=args.n, net=net, progress=False)["metrics"]
            row = dict(label=label, run=str(run), checkpoint=str(ckpt), cfg_scale=scale, fid=metrics["fid"],
                       class_accuracy=metrics.get("class_accuracy"), seconds=time.perf_counter() - start, **protocol)
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{label:<16} cfg {scale:<5g} FID {row['fid']:7.3f}  acc {row['class_accuracy']:.3f}", flush=True)
    rows = [r for r in rows if r["label"] in labels and r["cfg_scale"] in args.cfg]
    first = load_run(args.runs[0])[0]
    floor = floor_of(first, args.n, out, net or feature_network(first.data, progress=False))
    curves = {label: sorted((r for r in rows if r["label"] == label), key=lambda r: r["cfg_scale"]) for label in labels}
    plot(curves, floor, out / "guidance.png")
    report(curves)


def fid_at_accuracy(curve: list[dict], accuracy: float) -> float | None:
    """FID where the run's (class accuracy, FID) path, in order of guidance scale, first reaches
    `accuracy`: linear between the two neighbouring scales; None if it never does."""
    for lo, hi in zip(curve, curve[1:] + [None]):
        if hi is None:
            return lo["fid"] if lo["class_accuracy"] >= accuracy else None
        if lo["class_accuracy"] >= accuracy:
            return lo["fid"]
        if hi["class_accuracy"] >= accuracy:
            w = (accuracy - lo["class_accuracy"]) / (hi["class_accuracy"] - lo["class_accuracy"])
            return lo["fid"] + w * (hi["fid"] - lo["fid"])
    return None


def report(curves: dict[str, list[dict]]) -> None:
    common = min(max(r["class_accuracy"] for r in c) for c in curves.values())
    print(f"\n{'run':<16} {'best FID (scale)':<20} FID at class accuracy {common:.3f} (the highest every run reaches)")
    for label, curve in curves.items():
        best = min(curve, key=lambda r: r["fid"])
        print(f"{label:<16} {best['fid']:6.3f} ({best['cfg_scale']:g}){'':<8} {fid_at_accuracy(curve, common):6.3f}")


def plot(curves: dict[str, list[dict]], floor: float, path: Path) -> None:
    fig, (by_scale, trade) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, curve in curves.items():
        scales = [r["cfg_scale"] for r in curve]
        fids = [r["fid"] for r in curve]
        accuracy = [r["class_accuracy"] for r in curve]
        line, = by_scale.plot(scales, fids, marker="o", label=label)
        trade.plot(accuracy, fids, marker="o", color=line.get_color(), label=label)
        for a, f, s in zip(accuracy, fids, scales):
            trade.annotate(f"{s:g}", (a, f), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax in (by_scale, trade):
        ax.axhline(floor, color="grey", ls=":", label="real vs real")
        ax.set_ylabel("FID (domain network)")
        ax.grid(alpha=0.3)
    by_scale.set_xlabel("guidance scale")
    by_scale.set_title("FID against guidance scale")
    trade.set_xlabel("class accuracy of the samples")
    trade.set_title("the trade-off (labels: guidance scale)")
    by_scale.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
