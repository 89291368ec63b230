"""Arms of one preset against a reference arm, paired by seed: the training options against the
plain loss (benchmarks/training_options.sh), shared gate heads against per-unit ones
(benchmarks/gate_sharing.sh). Both scripts run this at their end.

Each arm is a lab results file; the arm holds its cells of the preset, variant and depth. The
first arm is the reference and keeps only cells without `--set` overrides (a depth-study
directory may hold other runs of the preset). At every evaluation point it prints FID and class
accuracy (mean +- std over seeds) and each arm's FID ratio to the reference paired by seed (same
seed: same initial weights, data order and noise), read against 1 with nrdm.lab.compare.verdict:
an arm is better only where it is "lower" beyond the spread. Writes OUT/<name>-<preset>-<variant>.png.

    python benchmarks/arm_report.py --preset digits-flow --name options \\
        --arm plain=runs/depth-study/converged/results.jsonl \\
        --arm min-snr=runs/options/digits-flow-min-snr/results.jsonl --out runs/options
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nrdm.config import load_config  # noqa: E402
from nrdm.lab.compare import paired_ratios, verdict  # noqa: E402
from nrdm.lab.grid import load_results  # noqa: E402
from nrdm.lab.plots import curve_points, finish_quality_and_accuracy, seed_count  # noqa: E402


def arm(path: Path, preset: str, variant: str, depth: int, label: str, reference: bool) -> list[dict]:
    """The cells of (preset, variant, depth) in a results file, relabelled as one arm."""
    if not path.exists():
        return []
    rows = [r for r in load_results(path) if r["preset"] == preset and r["variant"] == variant and r["depth"] == depth
            and not r["diverged"] and not (reference and r.get("overrides"))]
    return [{**r, "variant": label} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--variant", default="nrdm")
    parser.add_argument("--depth", type=int, help="default: the preset's")
    parser.add_argument("--arm", action="append", required=True, metavar="NAME=RESULTS",
                        help="an arm's lab results.jsonl; the first is the reference")
    parser.add_argument("--name", default="arms", help="the plot's file name prefix")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    depth = args.depth or load_config(args.preset).model.depth
    specs = [spec.split("=", 1) for spec in args.arm]
    arms = {name: arm(Path(path), args.preset, args.variant, depth, name, reference=i == 0)
            for i, (name, path) in enumerate(specs)}
    reference = specs[0][0]
    if not arms[reference]:
        raise SystemExit(f"no {args.variant} cells of {args.preset} at depth {depth} without overrides in {specs[0][1]}")
    arms = {name: rows for name, rows in arms.items() if rows}
    records = [r for rows in arms.values() for r in rows]

    print(f"{args.preset}, {args.variant}, depth {depth}: FID ratio to {reference} paired by seed (mean +- std), "
          f"and its verdict")
    print(f"{'arm':<16} {'seeds':>5} {'step':>6} {'FID':>16} {'class accuracy':>16} {'FID / ' + reference:>18}  verdict")
    for name, rows in arms.items():
        accuracy = {p["step"]: p for p in curve_points(rows, "class_accuracy")}
        ratios = {r["step"]: r for r in paired_ratios(records, name, reference)} if name != reference else {}
        for p in curve_points(rows, "quality"):
            a, ratio = accuracy.get(p["step"]), ratios.get(p["step"])
            acc = f"{a['mean']:>8.3f} +- {a['std']:.3f}" if a else f"{'-':>16}"
            rel = f"{ratio['mean']:>10.3f} +- {ratio['std']:.3f}  {verdict(ratio)}" if ratio else ""
            print(f"{name:<16} {len(p['values']):>5} {p['step']:>6} {p['mean']:>8.3f} +- {p['std']:.3f} {acc} {rel}")

    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in arms.items():
        style = dict(marker="o", capsize=3, ls="-" if name == reference else "--",
                     label=f"{name}, {seed_count(len(rows))}")
        for ax, field in ((ax_fid, "quality"), (ax_acc, "class_accuracy")):
            points = curve_points(rows, field)
            ax.errorbar([p["step"] for p in points], [p["mean"] for p in points], [p["std"] for p in points], **style)
    path = finish_quality_and_accuracy(fig, ax_fid, ax_acc, arms[reference][0]["quality_floor"],
                                       f"{args.preset}, {args.variant}: ", "training step",
                                       Path(args.out) / f"{args.name}-{args.preset}-{args.variant}.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
