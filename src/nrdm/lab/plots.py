"""Plots of a grid's results (PNG, matplotlib): quality against steps and against depth per
variant, per-unit sensitivity against unit index, gates against diffusion time. Every curve is
the mean over seeds with a band of +-1 standard deviation, so a ranking is only read where it
holds beyond the seed spread."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np


def _mean_std(values):
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    return (float(a.mean()), float(a.std()), len(a)) if len(a) else (math.nan, math.nan, 0)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (dataset, variant, depth, gamma): mean/std over seeds of final energy and loss,
    the floor, and how many seeds diverged."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["variant"], r["depth"], r["gamma"])].append(r)
    rows = []
    for (dataset, variant, depth, gamma), rs in sorted(groups.items()):
        e_mean, e_std, n_ok = _mean_std([r.get("energy") for r in rs])
        l_mean, l_std, _ = _mean_std([r.get("final_loss") for r in rs])
        rows.append({"dataset": dataset, "variant": variant, "depth": depth, "gamma": gamma, "seeds": len(rs),
                     "diverged": sum(r["diverged"] for r in rs), "energy_mean": e_mean, "energy_std": e_std,
                     "loss_mean": l_mean, "loss_std": l_std,
                     "energy_floor": float(np.mean([r["energy_floor"] for r in rs]))})
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    import csv
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_all(records: list[dict], out_dir: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    variants = sorted({r["variant"] for r in records})
    colors = {v: plt.cm.tab10(i) for i, v in enumerate(variants)}

    # 1. quality against training steps (deepest depth, each gamma)
    for gamma in sorted({r["gamma"] for r in records}):
        depth = max(r["depth"] for r in records)
        fig, ax = plt.subplots(figsize=(6, 4))
        for v in variants:
            rs = [r for r in records if r["variant"] == v and r["gamma"] == gamma and r["depth"] == depth]
            by_step = defaultdict(list)
            for r in rs:
                for point in r["curve"]:
                    by_step[point["step"]].append(point["energy"])
            if by_step:
                steps = sorted(by_step)
                stats = [_mean_std(by_step[s]) for s in steps]
                m, sd = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
                ax.plot(steps, m, "o-", color=colors[v], label=v)
                ax.fill_between(steps, m - sd, m + sd, color=colors[v], alpha=0.2)
        floor = np.mean([r["energy_floor"] for r in records])
        ax.axhline(floor, ls="--", color="gray", label="real vs real")
        ax.set(xlabel="training step", ylabel="energy distance to data (lower is better)",
               title=f"quality vs steps (depth {depth}, gamma {gamma:g})")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"quality_vs_steps_gamma{gamma:g}.png"))

    # 2. quality against depth
    rows = summarize(records)
    for gamma in sorted({r["gamma"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for v in variants:
            rs = sorted((r for r in rows if r["variant"] == v and r["gamma"] == gamma), key=lambda r: r["depth"])
            if rs:
                d = [r["depth"] for r in rs]
                m, sd = np.array([r["energy_mean"] for r in rs]), np.array([r["energy_std"] for r in rs])
                ax.errorbar(d, m, yerr=sd, marker="o", capsize=3, color=colors[v], label=v)
                for r in rs:
                    if r["diverged"]:
                        ax.annotate(f"{r['diverged']} div.", (r["depth"], r["energy_mean"] if math.isfinite(r["energy_mean"]) else 1),
                                    fontsize=7, color=colors[v])
        floor = np.mean([r["energy_floor"] for r in rows])
        ax.axhline(floor, ls="--", color="gray", label="real vs real")
        depths = sorted({r["depth"] for r in rows})
        ax.set(xlabel="depth (gated units)", ylabel="energy distance (lower is better)", xscale="log",
               title=f"quality vs depth (gamma {gamma:g}), mean +- std over seeds")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"quality_vs_depth_gamma{gamma:g}.png"))

    # 3. per-unit sensitivity ||dL/dz_i|| against unit index (deepest depth, first seed)
    depth = max(r["depth"] for r in records)
    for gamma in sorted({r["gamma"] for r in records}):
        rs = [r for r in records if r["depth"] == depth and r["gamma"] == gamma and r["sensitivity"]]
        if not rs:
            continue
        fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 3.2), squeeze=False, sharey=True)
        for ax, v in zip(axes[0], variants):
            for r in [r for r in rs if r["variant"] == v][:1]:
                snaps = sorted(r["sensitivity"], key=int)
                for j, step in enumerate(snaps):
                    norms = [x if x is not None else math.nan for x in r["sensitivity"][step]]
                    ax.plot(range(len(norms)), norms, color=plt.cm.viridis(j / max(len(snaps) - 1, 1)),
                            label=f"step {step}")
            ax.set(title=v, xlabel="unit index", yscale="log")
        axes[0][0].set_ylabel("||dL/dz_i||")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"residual sensitivity per unit (depth {depth}, gamma {gamma:g})")
        written.append(_save(fig, out_dir / f"sensitivity_gamma{gamma:g}.png"))

    # 4. gates against diffusion time
    rs = [r for r in records if r.get("gates") and ("alpha_mean" in r["gates"] or "gate_mean" in r["gates"])]
    if rs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rs:
            g = r["gates"]
            for name, style in (("alpha_mean", "-"), ("beta_mean", "--"), ("gate_mean", ":")):
                if name in g:
                    ax.plot(g["t"], g[name], style, color=colors[r["variant"]], alpha=0.6,
                            label=f"{r['variant']} {name.split('_')[0]} d{r['depth']}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=6)
        ax.set(xlabel="diffusion step t", ylabel="mean gate value over units", title="gates vs diffusion time")
        written.append(_save(fig, out_dir / "gates_vs_time.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
