"""The study's comparison tables (Markdown), per setting x depth x gamma:

- curves: for each residual form, its final quality seed by seed, and the mean over seeds of the
  quality and the class accuracy at every evaluation step, so a reader sees how fast each form
  gets there and not only where it ends;
- paired ratios against a reference form: at every evaluation step, quality(form) / quality(reference)
  of the same seed (same data order and noise), mean +- std over the seeds both have. A ratio is
  resolved where its spread excludes 1.

Ratios compare equal steps; they compare equal wall-clock where the forms' step times are equal
(the residual forms run the same network: `benchmarks/variant_step_time.py` measures it).
"""
from __future__ import annotations

import math
from collections import defaultdict

from nrdm.lab.plots import curve_points, mean_std


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in records:
        groups[(r["setting"], r["depth"], r["gamma"])].append(r)
    return dict(sorted(groups.items()))


def _by_variant(records: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in records:
        out[r["variant"]].append(r)
    return {v: sorted(rs, key=lambda r: r["seed"]) for v, rs in sorted(out.items())}


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else "-"


def _spread(mean: float, std: float, n: int, digits: int = 3) -> str:
    """mean +- std over n seeds; one seed has no spread to state."""
    return _fmt(mean, digits) if n == 1 else f"{_fmt(mean, digits)} +- {_fmt(std, 2)}"


def curve_table(records: list[dict]) -> str:
    """One setting x depth x gamma: per form, the final quality (mean +- std, and per seed), then the
    mean quality and class accuracy over seeds at each evaluation step, and the final loss."""
    metric = records[0]["metric"]
    lines = [f"| form | seeds | {metric} at the end (per seed) | {metric} at each evaluation | "
             "class accuracy at each evaluation | final loss |", "|---|---|---|---|---|---|"]
    for variant, rs in _by_variant(records).items():
        final = [r.get("quality") for r in rs]
        mean, std, n = mean_std(final)
        seeds = ", ".join(f"s{r['seed']} {_fmt(q) if q is not None else 'diverged'}" for r, q in zip(rs, final))
        quality = " / ".join(f"{p['step']}: {_fmt(p['mean'])}" for p in curve_points(rs, "quality"))
        accuracy = " / ".join(f"{_fmt(p['mean'])}" for p in curve_points(rs, "class_accuracy")) or "-"
        loss = mean_std([r.get("final_loss") for r in rs])
        lines.append(f"| {variant} | {len(rs)} | {_spread(mean, std, n)} ({seeds}) | {quality} | {accuracy} | "
                     f"{_spread(*loss, digits=4)} |")
    return "\n".join(lines)


def paired_ratios(records: list[dict], variant: str, reference: str) -> list[dict]:
    """At each evaluation step both forms reached with the same seed: quality(variant) /
    quality(reference), seed by seed, and their mean and std. Only positive qualities have a
    ratio (the toy lab's energy distance can be <= 0 near its floor)."""
    def points(v):
        return {(r["seed"], p["step"]): p["quality"] for r in records if r["variant"] == v for p in r["curve"]
                if p.get("quality") is not None and math.isfinite(p["quality"]) and p["quality"] > 0}

    mine, theirs = points(variant), points(reference)
    by_step = defaultdict(list)
    for (seed, step), quality in sorted(mine.items()):
        if (seed, step) in theirs:
            by_step[step].append(quality / theirs[(seed, step)])
    out = []
    for step, ratios in sorted(by_step.items()):
        mean, std, n = mean_std(ratios)
        out.append({"step": step, "mean": mean, "std": std, "n": n, "ratios": ratios})
    return out


def verdict(ratio: dict) -> str:
    """A paired ratio (paired_ratios' entry) read against 1: "lower" or "higher" when one std
    around its mean excludes 1, else "level" (one seed: the sign alone is not a finding)."""
    if ratio["n"] < 2:
        return "level"
    if ratio["mean"] + ratio["std"] < 1:
        return "lower"
    return "higher" if ratio["mean"] - ratio["std"] > 1 else "level"


def ratio_table(records: list[dict], reference: str) -> str | None:
    """One setting x depth x gamma: each form's paired quality ratio against `reference` at every
    evaluation step; None when the reference form is not in the group."""
    if not any(r["variant"] == reference for r in records):
        return None
    lines = [f"| form / {reference} | seeds | ratio at each evaluation step (mean +- std over seeds) |", "|---|---|---|"]
    for variant in _by_variant(records):
        if variant == reference:
            continue
        ratios = paired_ratios(records, variant, reference)
        if ratios:
            cells = " / ".join(f"{r['step']}: {_spread(r['mean'], r['std'], r['n'])}" for r in ratios)
            lines.append(f"| {variant} | {max(r['n'] for r in ratios)} | {cells} |")
    return "\n".join(lines) if len(lines) > 2 else None


def format_comparison(records: list[dict], reference: str = "adaln-zero") -> str:
    """Every group's curve table and, where the reference form ran, its paired ratio table."""
    parts = []
    for (setting, depth, gamma), rs in _groups(records).items():
        parts += [f"### {setting}, depth {depth}, gamma {gamma:g}", "", curve_table(rs), ""]
        ratios = ratio_table(rs, reference)
        if ratios:
            parts += [f"Paired by seed, against {reference} (< 1: better than {reference}):", "", ratios, ""]
    return "\n".join(parts)
