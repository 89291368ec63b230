"""The training options against the plain loss (benchmarks/training_options.sh runs this at its end).

For one preset, reads the plain arm (the preset itself; by default the depth study's nrdm cells at
the preset's depth) and each option's lab grid (OPTIONS_DIR/<preset>-<option>/results.jsonl), and
prints at every evaluation point FID and class accuracy (mean +- std over seeds) and the option's
FID ratio to the plain loss paired by seed (same seed: same initial weights, data order and noise),
read against 1 with nrdm.lab.compare.verdict. An option becomes a default only where it is lower
beyond the spread at the end and not higher anywhere. Writes OUT/options-<preset>.png.

    python benchmarks/options_report.py --preset digits-flow --options-dir runs/options \\
        --plain runs/depth-study/converged/results.jsonl --out runs/options
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nrdm.config import load_config  # noqa: E402
from nrdm.lab.compare import paired_ratios, verdict  # noqa: E402
from nrdm.lab.grid import load_results  # noqa: E402
from nrdm.lab.plots import curve_points, finish_quality_and_accuracy  # noqa: E402

OPTIONS = ("min-snr", "logit-normal", "cosine")        # the names training_options.sh gives its grids


def arm(path: Path, preset: str, depth: int, label: str, plain: bool) -> list[dict]:
    """The preset's nrdm cells at its depth in a results file, relabelled as one arm; the plain arm
    keeps only cells without overrides (the depth study also holds other runs of the preset)."""
    rows = [r for r in load_results(path) if r["preset"] == preset and r["variant"] == "nrdm" and r["depth"] == depth
            and not r["diverged"] and (not plain or not r.get("overrides"))]
    return [{**r, "variant": label} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--options-dir", required=True, help="OUT of training_options.sh")
    parser.add_argument("--plain", help="results.jsonl holding the plain cells (default: OPTIONS_DIR/<preset>-plain)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    depth = load_config(args.preset).model.depth
    options_dir = Path(args.options_dir)
    plain_path = Path(args.plain) if args.plain else options_dir / f"{args.preset}-plain" / "results.jsonl"
    arms = {"plain": arm(plain_path, args.preset, depth, "plain", plain=True)}
    for name in OPTIONS:
        arms[name] = arm(options_dir / f"{args.preset}-{name}" / "results.jsonl", args.preset, depth, name, plain=False)
    arms = {name: rows for name, rows in arms.items() if rows}
    if "plain" not in arms:
        raise SystemExit(f"no plain cells of {args.preset} at depth {depth} in {plain_path}")
    records = [r for rows in arms.values() for r in rows]

    print(f"{args.preset} (nrdm, depth {depth}); FID ratio to plain paired by seed, mean +- std, and its verdict")
    print(f"{'arm':<13} {'seeds':>5} {'step':>6} {'FID':>16} {'class accuracy':>16} {'FID / plain':>16}  verdict")
    for name, rows in arms.items():
        accuracy = {p["step"]: p for p in curve_points(rows, "class_accuracy")}
        ratios = {r["step"]: r for r in paired_ratios(records, name, "plain")} if name != "plain" else {}
        for p in curve_points(rows, "quality"):
            a, ratio = accuracy.get(p["step"]), ratios.get(p["step"])
            acc = f"{a['mean']:>8.3f} +- {a['std']:.3f}" if a else f"{'-':>16}"
            rel = f"{ratio['mean']:>8.3f} +- {ratio['std']:.3f}  {verdict(ratio)}" if ratio else ""
            print(f"{name:<13} {len(p['values']):>5} {p['step']:>6} {p['mean']:>8.3f} +- {p['std']:.3f} {acc} {rel}")

    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in arms.items():
        style = dict(marker="o", capsize=3, ls="-" if name == "plain" else "--", label=f"{name}, {len(rows)} seed(s)")
        for ax, field in ((ax_fid, "quality"), (ax_acc, "class_accuracy")):
            points = curve_points(rows, field)
            ax.errorbar([p["step"] for p in points], [p["mean"] for p in points], [p["std"] for p in points], **style)
    path = finish_quality_and_accuracy(fig, ax_fid, ax_acc, arms["plain"][0]["quality_floor"], f"{args.preset}: ",
                                       "training step", Path(args.out) / f"options-{args.preset}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
