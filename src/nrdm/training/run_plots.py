"""`nrdm plot RUN [RUN ...]`: a run's log.jsonl as PNGs, several runs overlaid (one colour each).

    training.png      loss (log scale), learning rate and images/s against the step
    eval.png          every metric the run evaluated (FID, class accuracy, ...) against the step
    sensitivity.png   the last diagnostics record: ||dL/dz|| entering each gated unit, by unit index
                      (the per-unit sensitivity of SPEC section 3; flat = no unit's signal explodes)
A figure none of the runs has data for is not written.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_log(run: str | Path) -> list[dict]:
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no log.jsonl: pass run directories written by `nrdm train`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(records: list[dict], get) -> tuple[list, list]:
    points = [(r["step"], get(r)) for r in records if "step" in r and get(r) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: list[str | Path], out_dir: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {Path(run).name or str(run): read_log(run) for run in runs}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    panels = [("loss", lambda r: r.get("loss"), "log"), ("learning rate", lambda r: r.get("lr"), "linear"),
              ("images / s", lambda r: r.get("images_per_s"), "linear")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, get, scale) in zip(axes, panels):
        for name, records in logs.items():
            ax.plot(*_series(records, get), label=name)
        ax.set(title=title, xlabel="step", yscale=scale)
    axes[0].legend(fontsize=8)
    save(fig, "training.png")

    metrics = sorted({k for records in logs.values() for r in records for k in r.get("eval", {})
                      if not k.endswith("_std")})
    if metrics:
        cols = min(4, len(metrics))
        rows = -(-len(metrics) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(metrics):]:
            ax.set_visible(False)
        for ax, metric in zip(axes.flat, metrics):
            for name, records in logs.items():
                ax.plot(*_series(records, lambda r: r.get("eval", {}).get(metric)), marker="o", label=name)
            ax.set(title=metric, xlabel="step")
        axes.flat[0].legend(fontsize=8)
        save(fig, "eval.png")

    last = {name: [r for r in records if "diagnostics" in r][-1] for name, records in logs.items()
            if any("diagnostics" in r for r in records)}
    if last:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for name, record in last.items():
            norms = record["diagnostics"]["adjoint_norm"]
            ax.plot(range(len(norms)), norms, marker=".", label=f"{name} (step {record['step']})")
        ax.set(title="||dL/dz|| entering each unit (last diagnostics)", xlabel="unit (input side first)",
               ylabel="adjoint norm", yscale="log")
        ax.legend(fontsize=8)
        save(fig, "sensitivity.png")
    return written
