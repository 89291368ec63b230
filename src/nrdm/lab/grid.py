"""Resumable experiment grids: {variant} x {depth} x {gamma} x {seed}, one cell at a time, each
cell's result appended as one JSON line. Re-running a grid skips the cells already recorded; a
diverging cell (non-finite loss, or loss above 10x its running minimum) is recorded as diverged
with its step and never stops the grid. `shard=(i, n)` runs every n-th cell starting at i, so n
processes (or machines) can share one grid and one results file.

Every cell runner returns a record with the same fields, whatever the setting:
    key, setting, variant, depth, gamma, seed       what the cell is
    metric, quality, quality_floor                  final sample quality (lower is better) and
                                                    its real-vs-real floor at the same n
    final_loss, curve [{step, loss, quality}]       training curves
    sensitivity {step: [||dL/dz_i|| per unit]}      residual sensitivity at several steps
    gates {t: [...], alpha_mean: [...], ...}        gate means against diffusion time
    diverged, diverged_step, seconds                wall-clock seconds the cell took (image cells: over all
    cpu_seconds                                     its invocations, from its log) and its CPU seconds
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable, Protocol

from tqdm.auto import tqdm

DIVERGENCE_FACTOR = 10.0


class Cell(Protocol):
    key: str

    def run(self, **kwargs) -> dict: ...


def load_results(path: str | Path) -> list[dict]:
    """The recorded cells, first record per key (two processes can finish the same cell)."""
    path = Path(path)
    if not path.exists():
        return []
    records: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records.setdefault(record["key"], record)
    return list(records.values())


def run_grid(cells: list[Cell], results: str | Path, progress: bool = True, shard: tuple[int, int] = (0, 1),
             **run_kwargs) -> list[dict]:
    """Run every cell of this shard not yet in `results` (JSONL), appending each result as it
    finishes (one write per line, so shards can share the file); returns all recorded results."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in load_results(results)}
    todo = [c for c in cells[index::count] if c.key not in done]
    for i, cell in enumerate(tqdm(todo, desc="grid", disable=not progress)):
        record = cell.run(**run_kwargs)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(f"[{i + 1}/{len(todo)}] {describe(record)}")     # one line per cell, also in a background log
    return load_results(results)


def describe(record: dict) -> str:
    """One line on a finished cell: its key, final quality (or divergence), class accuracy, cost."""
    if record["diverged"]:
        outcome = f"diverged at step {record['diverged_step']}"
    else:
        accuracy = (record.get("eval") or {}).get("class_accuracy")
        outcome = f"{record['metric']} {record['quality']:.4g}" + (f", class accuracy {accuracy:.3f}" if accuracy is not None else "")
    cpu = f", {record['cpu_seconds'] / 60:.1f} CPU-min" if record.get("cpu_seconds") is not None else ""
    return f"{record['key']}: {outcome} ({record['seconds'] / 60:.1f} min{cpu})"


def product(make: Callable[..., Cell], variants, depths, gammas, seeds, **fixed) -> list[Cell]:
    """Cells for every (variant, depth, gamma, seed), shallow depths first so a partial grid is
    already a complete study at small depth."""
    return [make(variant=v, depth=d, gamma=g, seed=s, **fixed)
            for d, v, g, s in itertools.product(sorted(depths), variants, gammas, seeds)]
