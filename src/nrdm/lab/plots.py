"""Tables and plots of a grid's results (CSV; PNG with matplotlib): quality and loss against
training steps, quality against depth, per-unit sensitivity against unit index, gates against
diffusion time. Every curve is the mean over seeds with a band (or error bar) of +-1 standard
deviation, so a ranking is only read where it holds beyond the seed spread. One set of plots per
setting (toy dataset, or image dataset x backbone), the setting's name in front of each file."""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from pathlib import Path

import numpy as np



def _quality_axis(ax, floor: float) -> None:
    """The quality axis spans orders of magnitude: log scale down to just below a positive floor
    (image FID: real vs real); symlog through 0 where the floor is ~0 or unknown (the toy lab)."""
    if math.isfinite(floor) and floor > 0.01:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8 * floor)
    else:
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_ylim(bottom=min(floor, 0.0) - 0.002 if math.isfinite(floor) else None)

def mean_std(values) -> tuple[float, float, int]:
    """Mean, population std and count of the finite values (None and NaN are left out)."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    return (float(a.mean()), float(a.std()), len(a)) if len(a) else (math.nan, math.nan, 0)


def sensitivity_ratio(record: dict) -> float | None:
    """||dL/dz_first|| / ||dL/dz_last|| at the last sensitivity snapshot: how much the adjoint
    grows (> 1) or shrinks (< 1) from the output end of the stack back to its input end."""
    if not record.get("sensitivity"):
        return None
    norms = [x for x in record["sensitivity"][max(record["sensitivity"], key=int)] if x]
    return norms[0] / norms[-1] if len(norms) >= 2 else None


def summarize(records: list[dict]) -> list[dict]:
    """One row per (setting, variant, depth, gamma): mean/std over seeds of the final quality and
    loss, the quality floor, how many seeds diverged, and the geometric mean over seeds of the
    sensitivity ratio (first unit / last unit) at the end of training."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["setting"], r["variant"], r["depth"], r["gamma"])].append(r)
    rows = []
    for (setting, variant, depth, gamma), rs in sorted(groups.items()):
        q_mean, q_std, _ = mean_std([r.get("quality") for r in rs])
        l_mean, l_std, _ = mean_std([r.get("final_loss") for r in rs])
        a_mean, a_std, _ = mean_std([(r.get("eval") or {}).get("class_accuracy") for r in rs])
        ratios = [math.log(x) for x in map(sensitivity_ratio, rs) if x]
        rows.append({"setting": setting, "variant": variant, "depth": depth, "gamma": gamma, "seeds": len(rs),
                     "diverged": sum(r["diverged"] for r in rs), "metric": rs[0]["metric"],
                     "quality_mean": q_mean, "quality_std": q_std, "loss_mean": l_mean, "loss_std": l_std,
                     "class_accuracy_mean": a_mean, "class_accuracy_std": a_std,
                     "quality_floor": mean_std([r.get("quality_floor") for r in rs])[0],
                     "sensitivity_ratio": math.exp(float(np.mean(ratios))) if ratios else math.nan,
                     "minutes_per_seed": float(np.mean([r["seconds"] for r in rs])) / 60,
                     "cpu_minutes_per_seed": mean_std([r.get("cpu_seconds") for r in rs])[0] / 60})
    return rows


def study_cost(records: list[dict]) -> str:
    """One line on what the cells cost: CPU-process-hours and wall-clock hours summed over the
    cells whose logs state their CPU time (image cells run by this version; see RunClock)."""
    known = [r for r in records if r.get("cpu_seconds") is not None]
    if not known:
        return "cost: no cell's log states its CPU time"
    cpu, wall = (sum(r[k] for r in known) / 3600 for k in ("cpu_seconds", "seconds"))
    return f"cost: {cpu:.2f} CPU-process-hours, {wall:.2f} process wall-clock hours, over {len(known)}/{len(records)} cells"


def write_csv(rows: list[dict], path: str | Path) -> Path:
    import csv
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_rows(rows: list[dict]) -> str:
    """The summary as a Markdown table (mean +- std over seeds)."""
    accuracy = any(math.isfinite(r["class_accuracy_mean"]) for r in rows)
    lines = ["| setting | variant | depth | gamma | quality (mean +- std) | floor | "
             + ("class accuracy | " if accuracy else "") + "final loss | sensitivity first/last unit | diverged |",
             "|---|---|---|---|---|---|" + ("---|" if accuracy else "") + "---|---|---|"]
    for r in rows:
        acc = f"{r['class_accuracy_mean']:.3f} +- {r['class_accuracy_std']:.3f} | " if accuracy else ""
        lines.append(f"| {r['setting']} | {r['variant']} | {r['depth']} | {r['gamma']:g} | "
                     f"{r['quality_mean']:.4g} +- {r['quality_std']:.2g} | {r['quality_floor']:.3g} | {acc}"
                     f"{r['loss_mean']:.4f} +- {r['loss_std']:.4f} | {r['sensitivity_ratio']:.3g} | {r['diverged']}/{r['seeds']} |")
    return "\n".join(lines)


def plot_all(records: list[dict], out_dir: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    variants = sorted({r["variant"] for r in records})
    colors = {v: plt.cm.tab10(i) for i, v in enumerate(variants)}
    for setting in sorted({r["setting"] for r in records}):
        rs = [r for r in records if r["setting"] == setting]
        written += _plot_setting(plt, rs, setting, variants, colors, out_dir)
    # plots the last report wrote and this one did not (a setting that gained a depth renames its
    # plots) would show an older state of the grid: remove them; files of others stay
    manifest = out_dir / "plots.txt"
    if manifest.exists():
        for name in set(manifest.read_text().split()) - {p.name for p in written}:
            (out_dir / name).unlink(missing_ok=True)
    manifest.write_text("".join(f"{p.name}\n" for p in written))
    return written


def _plot_setting(plt, records, setting, variants, colors, out_dir: Path) -> list[Path]:
    written = []
    metric = records[0]["metric"]
    floor = mean_std([r.get("quality_floor") for r in records])[0]
    deepest = max(r["depth"] for r in records)
    gammas = sorted({r["gamma"] for r in records})
    depths = sorted({r["depth"] for r in records})

    def prefix(depth: int) -> str:
        """The per-depth plots of a setting with several depths carry the depth in their name."""
        return setting if len(depths) == 1 else f"{setting}-d{depth}"

    # 1. quality and loss against training steps (each depth and gamma)
    for depth, gamma in itertools.product(depths, gammas):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for v in variants:
            rs = [r for r in records if r["variant"] == v and r["gamma"] == gamma and r["depth"] == depth]
            for ax, field in zip(axes, ("quality", "loss")):
                by_step = defaultdict(list)
                for r in rs:
                    for point in r["curve"]:
                        by_step[point["step"]].append(point.get(field))
                if by_step:
                    steps = sorted(by_step)
                    stats = [mean_std(by_step[s]) for s in steps]
                    m, sd = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
                    ax.plot(steps, m, "o-", color=colors[v], label=f"{v} ({seed_count(len(rs))})")
                    ax.fill_between(steps, m - sd, m + sd, color=colors[v], alpha=0.2)
        if math.isfinite(floor):
            axes[0].axhline(floor, ls="--", color="gray", label="real vs real")
        axes[0].set(xlabel="training step", ylabel=f"{metric} (lower is better)", title="sample quality")
        _quality_axis(axes[0], floor)
        axes[1].set(xlabel="training step", ylabel="training loss (denoising MSE)", title="loss", yscale="log")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{setting}: depth {depth}, gamma {gamma:g} (mean +- std over seeds)")
        written.append(_save(fig, out_dir / f"{prefix(depth)}_quality_vs_steps_gamma{gamma:g}.png"))

    # 1b. FID and class accuracy against steps and against training seconds, every depth: the
    # equal-wall-clock comparison (deeper or gated forms cost more per step)
    if any(point.get("seconds") is not None for r in records for point in r["curve"]):
        for gamma in gammas:
            fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
            for v in variants:
                for depth in sorted({r["depth"] for r in records}):
                    rs = [r for r in records if r["variant"] == v and r["gamma"] == gamma and r["depth"] == depth]
                    style = "o-" if depth == deepest else "s--"
                    for row, field in enumerate(("quality", "class_accuracy")):
                        for col, x_field in enumerate(("step", "seconds")):
                            _curve(axes[row, col], rs, x_field, field, style, colors[v], f"{v} d{depth} ({len(rs)})")
            for col, xlabel in enumerate(("training step", "training seconds (one process)")):
                axes[0, col].set(xlabel=xlabel, ylabel=f"{metric} (lower is better)", yscale="log")
                axes[1, col].set(xlabel=xlabel, ylabel="class accuracy of samples")
                if math.isfinite(floor):
                    axes[0, col].axhline(floor, ls="--", color="gray", label="real vs real")
            axes[0, 1].legend(fontsize=6, ncol=2)
            fig.suptitle(f"{setting}: quality against steps and wall-clock, gamma {gamma:g} (mean +- std over seeds)")
            written.append(_save(fig, out_dir / f"{setting}_quality_vs_time_gamma{gamma:g}.png"))

    # 2. quality against depth
    rows = summarize(records)
    for gamma in gammas:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for v in variants:
            rs = sorted((r for r in rows if r["variant"] == v and r["gamma"] == gamma), key=lambda r: r["depth"])
            if not rs:
                continue
            m, sd = np.array([r["quality_mean"] for r in rs]), np.array([r["quality_std"] for r in rs])
            ax.errorbar([r["depth"] for r in rs], m, yerr=sd, marker="o", capsize=3, color=colors[v], label=v)
            for r in rs:
                if r["diverged"]:
                    y = r["quality_mean"] if math.isfinite(r["quality_mean"]) else np.nanmax(m) if np.isfinite(m).any() else 1
                    ax.annotate(f"{r['diverged']}/{r['seeds']} div.", (r["depth"], y), fontsize=7, color=colors[v])
        if math.isfinite(floor):
            ax.axhline(floor, ls="--", color="gray", label="real vs real")
        ax.set(xlabel="depth (units)" if setting.startswith("toy") else "depth (blocks)",
               ylabel=f"{metric} (lower is better)", xscale="log",
               title=f"{setting}: quality vs depth, gamma {gamma:g}\n(mean +- std over seeds)")
        ax.set_xticks(depths, [str(d) for d in depths])
        _quality_axis(ax, floor)
        ax.minorticks_off()
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"{setting}_quality_vs_depth_gamma{gamma:g}.png"))

    # 3. per-unit sensitivity ||dL/dz_i|| against unit index (each depth and gamma, first seed)
    for depth, gamma in itertools.product(depths, gammas):
        rs = [r for r in records if r["depth"] == depth and r["gamma"] == gamma and r["sensitivity"]]
        shown = [v for v in variants if any(r["variant"] == v for r in rs)]
        if not shown:
            continue
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.3), squeeze=False, sharey=True)
        for ax, v in zip(axes[0], shown):
            r = min((r for r in rs if r["variant"] == v), key=lambda r: r["seed"])
            snaps = sorted(r["sensitivity"], key=int)
            for j, step in enumerate(snaps):
                norms = [x if x is not None else math.nan for x in r["sensitivity"][step]]
                ax.plot(range(len(norms)), norms, color=plt.cm.viridis(j / max(len(snaps) - 1, 1)), label=f"step {step}")
            ax.set(title=v + (" (diverged)" if r["diverged"] else ""), xlabel="unit index (input -> output)", yscale="log")
        axes[0][0].set_ylabel("||dL/dz_i||")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{setting}: residual sensitivity per unit (depth {depth}, gamma {gamma:g}, seed {r['seed']})")
        written.append(_save(fig, out_dir / f"{prefix(depth)}_sensitivity_gamma{gamma:g}.png"))

    # 4. sensitivity ratio (first unit / last unit) against depth: every seed as a dot, geometric mean as a line
    for gamma in gammas:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for v in variants:
            rs = [r for r in records if r["variant"] == v and r["gamma"] == gamma and sensitivity_ratio(r)]
            if not rs:
                continue
            ax.scatter([r["depth"] for r in rs], [sensitivity_ratio(r) for r in rs], color=colors[v], s=12, alpha=0.6)
            line = sorted((r for r in rows if r["variant"] == v and r["gamma"] == gamma
                           and math.isfinite(r["sensitivity_ratio"])), key=lambda r: r["depth"])
            ax.plot([r["depth"] for r in line], [r["sensitivity_ratio"] for r in line], "-", color=colors[v], label=v)
        ax.axhline(1.0, ls="--", color="gray")
        ax.set(xlabel="depth", ylabel="||dL/dz_first|| / ||dL/dz_last|| (end of training)", xscale="log",
               yscale="log", title=f"{setting}: sensitivity growth through the stack, gamma {gamma:g}\n"
                                   f"(dots: seeds; line: geometric mean)")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"{setting}_sensitivity_vs_depth_gamma{gamma:g}.png"))

    # 5. gates against diffusion time (deepest depth, first seed of each variant and gamma)
    rs = [r for r in records if r["depth"] == deepest and r.get("gates") and len(r["gates"]) > 1]
    if rs:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for (v, gamma) in sorted({(r["variant"], r["gamma"]) for r in rs}):
            r = min((r for r in rs if r["variant"] == v and r["gamma"] == gamma), key=lambda r: r["seed"])
            for name, values in r["gates"].items():
                if name != "t":
                    style = {"alpha_mean": "-", "beta_mean": "--"}.get(name, ":")
                    ax.plot(r["gates"]["t"], values, style, marker=".", color=colors[v],
                            alpha=1.0 if gamma == 0 else 0.5, label=f"{v} {name[:-5]} gamma {gamma:g}")
        ax.legend(fontsize=6, ncol=2)
        ax.set(xlabel="diffusion step t", ylabel="gate value (mean over units, channels, batch)",
               title=f"{setting}: gates vs diffusion time (depth {deepest})")
        written.append(_save(fig, out_dir / f"{setting}_gates_vs_time.png"))
    return written


def seed_count(n: int) -> str:
    """'1 seed', '3 seeds': how many seeds a plotted mean is over, for legends."""
    return f"{n} seed{'' if n == 1 else 's'}"


def curve_points(records: list[dict], y_field: str, x_field: str = "step") -> list[dict]:
    """Mean +- std over seeds of y at each evaluation step that has finite x and y values: x is the
    mean over seeds of x_field (the step itself, or the training seconds by then); `values` are
    the seeds' own y values."""
    ys, xs = defaultdict(list), defaultdict(list)
    for r in records:
        for point in r["curve"]:
            ys[point["step"]].append(point.get(y_field))
            xs[point["step"]].append(point.get(x_field))
    points = []
    for step in sorted(ys):
        (mean, std, n), (x, _, n_x) = mean_std(ys[step]), mean_std(xs[step])
        if n and n_x:
            points.append(dict(step=step, x=x, mean=mean, std=std, values=[v for v in ys[step] if v is not None]))
    return points


def _curve(ax, records, x_field: str, y_field: str, style: str, color, label: str) -> None:
    """Mean +- std over seeds of y at each evaluation step, at x = the step or the mean over seeds
    of the training seconds by then."""
    points = curve_points(records, y_field, x_field)
    if not points:
        return
    x = np.array([p["x"] for p in points])
    m, sd = np.array([p["mean"] for p in points]), np.array([p["std"] for p in points])
    ax.plot(x, m, style, color=color, label=label, markersize=3)
    ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.15)


def finish_quality_and_accuracy(fig, ax_quality, ax_accuracy, floor: float | None, title: str, xlabel: str,
                                path: str | Path) -> Path:
    """The benchmark reports' two-panel figure (FID, class accuracy; mean +- std over seeds),
    finished alike: the real-vs-real floor, log FID axis, labels, grid and legend; saved to path."""
    if floor:
        ax_quality.axhline(floor, color="grey", ls=":", label="real vs real")
    ax_quality.set(yscale="log", ylabel="FID (domain network)", title=f"{title}FID (mean +- std over seeds)")
    ax_accuracy.set(ylabel="class accuracy of the samples", title="class accuracy")
    for ax in (ax_quality, ax_accuracy):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    ax_accuracy.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
