"""The DiMR comparison's table and plot (benchmarks/dimr_vs_flow.sh runs this at its end).

Reads the lab results of the flow arm (the depth study's digits-flow nrdm cells at depth 6), the
DiMR arm and the two ablations, and prints, at each evaluation point, FID and class accuracy as
mean +- std over seeds (population std, as the lab reports). The two arms' step counts were set
to equal wall-clock, so their k-th evaluation points fall at the same share of the budget; the
ablations run DiMR's step count (equal steps with the DiMR arm). Writes OUT/dimr_vs_flow.png.

    python benchmarks/dimr_report.py --flow runs/depth-study/converged/results.jsonl \\
        --dimr runs/dimr/compare/results.jsonl --ablation "ConvNeXt first branch=runs/dimr/convnext-first/results.jsonl" \\
        --ablation "adaLN-Zero units=runs/dimr/adaln-zero/results.jsonl" --out runs/dimr
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nrdm.lab.grid import load_results  # noqa: E402
from nrdm.lab.plots import curve_points, finish_quality_and_accuracy, seed_count  # noqa: E402


def cells(path: str, preset: str, variant: str | None = None, depth: int | None = None) -> list[dict]:
    return [r for r in load_results(path) if r["preset"] == preset and (variant is None or r["variant"] == variant)
            and (depth is None or r["depth"] == depth) and not r["diverged"]]


def curve(rows: list[dict]) -> list[dict]:
    """Per evaluation step: mean and std over seeds of FID and class accuracy, and the seeds' FIDs."""
    accuracy = {p["step"]: p for p in curve_points(rows, "class_accuracy")}
    return [dict(step=p["step"], fid=p["mean"], fid_std=p["std"], seeds=p["values"],
                 acc=accuracy[p["step"]]["mean"], acc_std=accuracy[p["step"]]["std"])
            for p in curve_points(rows, "quality")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow", required=True, help="results.jsonl holding the digits-flow nrdm cells")
    parser.add_argument("--dimr", required=True, help="results.jsonl of the DiMR arm")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=RESULTS")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    arms = {"flow (digits-flow)": cells(args.flow, "digits-flow", "nrdm", 6), "DiMR (digits-dimr)": cells(args.dimr, "digits-dimr")}
    for spec in args.ablation:
        name, path = spec.split("=", 1)
        if Path(path).exists():
            arms[f"DiMR, {name}"] = cells(path, "digits-dimr")
    curves = {name: curve(rows) for name, rows in arms.items() if rows}
    budgets = {name: max(r["steps"] for r in arms[name]) for name in curves}

    print(f"{'arm':<34} {'seeds':>5} {'step':>6} {'budget':>7} {'FID':>16} {'class accuracy':>16}  seeds' FID")
    for name, points in curves.items():
        for p in points:
            print(f"{name:<34} {len(p['seeds']):>5} {p['step']:>6} {p['step'] / budgets[name]:>7.2f} "
                  f"{p['fid']:>8.3f} +- {p['fid_std']:.3f} {p['acc']:>8.3f} +- {p['acc_std']:.3f}  "
                  f"{', '.join(f'{v:.3f}' for v in p['seeds'])}")

    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in curves.items():
        share = [p["step"] / budgets[name] for p in points]
        style = dict(marker="o", ls="--" if name.startswith("DiMR,") else "-", capsize=3,
                     label=f"{name}, {seed_count(len(arms[name]))}")
        ax_fid.errorbar(share, [p["fid"] for p in points], [p["fid_std"] for p in points], **style)
        ax_acc.errorbar(share, [p["acc"] for p in points], [p["acc_std"] for p in points], **style)
    floor = arms["flow (digits-flow)"][0]["quality_floor"] if arms["flow (digits-flow)"] else None
    path = finish_quality_and_accuracy(fig, ax_fid, ax_acc, floor, "", "share of the training budget (equal wall-clock)",
                                       Path(args.out) / "dimr_vs_flow.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
