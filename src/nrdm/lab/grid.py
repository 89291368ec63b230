"""Resumable experiment grids: {variant} x {depth} x {gamma} x {seed}, one cell at a time, each
cell's result appended as one JSON line. Re-running a grid skips the cells already recorded; a
diverging cell (non-finite loss, or loss above 10x its running minimum) is recorded as diverged
with its step and never stops the grid.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss, eps_predictor, sample
from nrdm.lab.toy import ToyDenoiser, energy_distance, sample_toy, toy_dim

DIVERGENCE_FACTOR = 10.0


@dataclass(frozen=True)
class ToyCell:
    dataset: str
    variant: str
    depth: int
    gamma: float
    seed: int
    width: int = 64
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    penalty_units: int = 1

    @property
    def key(self) -> str:
        return f"{self.dataset}|{self.variant}|d{self.depth}|g{self.gamma:g}|s{self.seed}"


def run_toy_cell(cell: ToyCell, eval_n: int = 2000, sample_steps: int = 50, snapshots: int = 4,
                 curve_points: int = 5) -> dict:
    """Train one toy model; return its loss/energy curve, final energy distance (with the
    real-vs-real floor at the same n), per-unit sensitivity at `snapshots` points of training,
    gate statistics against diffusion time at the end, and divergence status."""
    torch.manual_seed(cell.seed)
    gen = torch.Generator().manual_seed(cell.seed)
    schedule = VPSchedule("linear")
    model = ToyDenoiser(toy_dim(cell.dataset), cell.width, cell.depth, unit=cell.variant)
    opt = torch.optim.AdamW(model.parameters(), lr=cell.lr)
    loss_cfg = LossConfig(gamma=cell.gamma, penalty_units=min(cell.penalty_units, cell.depth), label_drop=0.0)
    snap_at = {max(1, round(cell.steps * (i + 1) / snapshots)) for i in range(snapshots)} | {1}
    curve_at = {max(1, round(cell.steps * (i + 1) / curve_points)) for i in range(curve_points)}
    result = {**asdict(cell), "key": cell.key, "diverged": False, "diverged_step": None, "curve": [],
              "sensitivity": {}, "start": time.time()}
    running_min, recent = math.inf, []
    for step in range(1, cell.steps + 1):
        x0 = sample_toy(cell.dataset, cell.batch_size, gen)
        out = diffusion_loss(model, x0, None, schedule, loss_cfg, generator=gen, diagnostics=step in snap_at)
        loss = float(out.loss.detach())
        if not math.isfinite(loss) or (step > 100 and loss > DIVERGENCE_FACTOR * running_min):
            result.update(diverged=True, diverged_step=step, diverged_loss=loss if math.isfinite(loss) else str(loss))
            break
        running_min = min(running_min, loss)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [float(out.mse)])[-50:]
        if out.tracer is not None:
            result["sensitivity"][str(step)] = out.tracer.diagnostics()["adjoint_norm"]
        if step in curve_at:
            result["curve"].append({"step": step, "loss": sum(recent) / len(recent),
                                    "energy": _energy(model, schedule, cell, eval_n // 2, sample_steps, step)})
    if not result["diverged"]:
        result["final_loss"] = sum(recent) / len(recent)
        result["energy"] = _energy(model, schedule, cell, eval_n, sample_steps, 0)
        result["gates"] = _gates_vs_time(model, cell)
    floor_gen = torch.Generator().manual_seed(10_000 + cell.seed)
    result["energy_floor"] = energy_distance(sample_toy(cell.dataset, eval_n, floor_gen),
                                             sample_toy(cell.dataset, eval_n, floor_gen))
    result["seconds"] = time.time() - result.pop("start")
    return result


@torch.no_grad()
def _energy(model, schedule, cell: ToyCell, n: int, steps: int, salt: int) -> float:
    model.eval()
    x_T = torch.randn(n, toy_dim(cell.dataset), generator=torch.Generator().manual_seed(cell.seed + 7 + salt))
    samples = sample(eps_predictor(model, schedule), x_T, schedule, "dpm++2m", steps)
    model.train()
    if not torch.isfinite(samples).all():
        return float("inf")
    truth = sample_toy(cell.dataset, n, torch.Generator().manual_seed(20_000 + cell.seed + salt))
    return energy_distance(samples, truth)


@torch.no_grad()
def _gates_vs_time(model, cell: ToyCell, times=(0, 100, 250, 500, 750, 999)) -> dict:
    """Mean |alpha| and mean beta over units (and channels) at several diffusion times."""
    from nrdm.models.tracing import UnitTracer

    x = sample_toy(cell.dataset, 256, torch.Generator().manual_seed(1))
    out = {"t": list(times)}
    for t in times:
        with UnitTracer(model, stats=True) as tracer:
            model(x, torch.full((len(x),), t))
        diag = tracer.diagnostics()
        for name in ("alpha_mean", "beta_mean", "gate_mean"):
            if name in diag:
                out.setdefault(name, []).append(sum(diag[name]) / len(diag[name]))
    return out


def load_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_grid(cells: list[ToyCell], results: str | Path, progress: bool = True, **cell_kwargs) -> list[dict]:
    """Run every cell not yet in `results` (JSONL), appending each result as it finishes."""
    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in load_results(results)}
    todo = [c for c in cells if c.key not in done]
    for cell in tqdm(todo, desc="grid", disable=not progress):
        record = run_toy_cell(cell, **cell_kwargs)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
    return load_results(results)


def toy_grid(dataset: str, variants, depths, gammas, seeds, **fixed) -> list[ToyCell]:
    return [ToyCell(dataset, v, d, g, s, **fixed) for v, d, g, s in itertools.product(variants, depths, gammas, seeds)]
