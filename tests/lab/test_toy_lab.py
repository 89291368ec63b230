"""The toy lab: ground-truth samplers and the energy distance, a tiny grid that writes its CSV and
plots, divergence recorded (not raised), and resuming a grid skips finished cells."""
import json

import pytest
import torch

from nrdm.cli import main as cli_main
from nrdm.lab.grid import ToyCell, load_results, run_grid, run_toy_cell
from nrdm.lab.toy import ToyDenoiser, energy_distance, sample_toy


def test_energy_distance_floor_and_sensitivity():
    g = torch.Generator().manual_seed(0)
    a, b = sample_toy("gmm2d", 1000, g), sample_toy("gmm2d", 1000, g)
    floor = energy_distance(a, b)
    assert abs(floor) < 0.01                                     # unbiased: ~0 for identical laws
    assert energy_distance(a, b + 0.5) > 20 * abs(floor)
    assert energy_distance(a, torch.randn(1000, 2)) > energy_distance(a, b)
    with pytest.raises(ValueError, match="allowed: gmm2d, moons, gmm16"):
        sample_toy("spiral", 10, g)


def test_toy_denoiser_units_are_identity_at_init():
    model = ToyDenoiser(dim=2, width=16, depth=5, unit="nrdm")
    z = torch.randn(4, 16)
    from nrdm.models.gated_unit import Conditioning
    cond = Conditioning(torch.randn(4, 16), torch.zeros(4))
    assert all(torch.equal(u(z, cond), z) for u in model.units)
    assert model(torch.randn(4, 2), torch.randint(0, 1000, (4,))).shape == (4, 2)


def test_tiny_grid_writes_csv_and_plots_and_resumes(tmp_path, capsys):
    args = ["lab", "toy", "--out", str(tmp_path), "--variants", "nrdm", "resnet", "--depths", "2", "4",
            "--gammas", "0", "0.01", "--seeds", "0", "--steps", "6", "--batch-size", "32", "--eval-n", "60",
            "--sample-steps", "3", "--no-progress"]
    assert cli_main(args) == 0
    records = load_results(tmp_path / "results.jsonl")
    assert len(records) == 8 and all(not r["diverged"] for r in records)
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,variant,depth,gamma") and len(csv) == 9
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"quality_vs_depth_gamma0.png", "quality_vs_steps_gamma0.01.png", "sensitivity_gamma0.png",
            "gates_vs_time.png"} <= plots
    assert "floor (real vs real" in capsys.readouterr().out
    mtime = (tmp_path / "results.jsonl").stat().st_mtime_ns
    assert cli_main(args) == 0                                   # all cells done: nothing re-run
    assert (tmp_path / "results.jsonl").stat().st_mtime_ns == mtime
    assert len(load_results(tmp_path / "results.jsonl")) == 8


def test_divergence_is_recorded_not_raised(tmp_path):
    cell = ToyCell("gmm2d", "resnet", 4, 0.0, 0, width=16, steps=300, batch_size=32, lr=1e4)
    result = run_toy_cell(cell, eval_n=50, sample_steps=3)
    assert result["diverged"] and result["diverged_step"] >= 1
    records = run_grid([cell], tmp_path / "r.jsonl", progress=False, eval_n=50, sample_steps=3)
    assert records[0]["diverged"] and json.loads((tmp_path / "r.jsonl").read_text())["key"] == cell.key
