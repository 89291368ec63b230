"""The toy lab: ground-truth samplers and the energy distance, a tiny grid that writes its CSV and
plots, divergence recorded (not raised), and resuming a grid skips finished cells."""
import json

import pytest
import torch

from nrdm.cli import main as cli_main
from nrdm.lab.grid import load_results, product, run_grid
from nrdm.lab.toy import ToyCell, ToyDenoiser, energy_distance, sample_toy


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
            "--sample-steps", "3", "--no-progress", "--reference", "resnet"]
    assert cli_main(args) == 0
    records = load_results(tmp_path / "results.jsonl")
    assert len(records) == 8 and all(not r["diverged"] for r in records)
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("setting,variant,depth,gamma,seeds,diverged,metric,quality_mean,quality_std") and len(csv) == 9
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"toy-gmm2d_quality_vs_depth_gamma0.png", "toy-gmm2d-d2_quality_vs_steps_gamma0.01.png",
            "toy-gmm2d-d4_quality_vs_steps_gamma0.01.png", "toy-gmm2d-d4_sensitivity_gamma0.png",
            "toy-gmm2d_gates_vs_time.png"} <= plots
    out = capsys.readouterr().out
    assert "| toy-gmm2d | resnet | 4 | 0.01 |" in out and "8 cells in the study (8/8" in out
    for r in records:                                            # every record carries the common schema
        assert len(r["curve"]) == 5 and r["curve"][-1]["step"] == 6 and r["final_loss"] > 0
        assert len(r["sensitivity"]["6"]) == r["depth"] and abs(r["quality_floor"]) < r["quality"]
        assert 0 < r["cpu_seconds"] and 0 < r["seconds"]
    assert "over 8/8 cells" in out
    comparison = (tmp_path / "comparison.md").read_text()
    assert "### toy-gmm2d, depth 4, gamma 0.01" in comparison and "| nrdm | 1 | 1: " in comparison
    assert "Paired by seed, against resnet" in comparison
    mtime = (tmp_path / "results.jsonl").stat().st_mtime_ns
    assert cli_main(args) == 0                                   # all cells done: nothing re-run
    assert (tmp_path / "results.jsonl").stat().st_mtime_ns == mtime
    assert len(load_results(tmp_path / "results.jsonl")) == 8

    # a report of one depth names its plots without the depth; when the grid gains a depth the
    # names change, and the report removes the plots it wrote before (not files of others)
    from nrdm.lab.plots import plot_all
    plots_dir = tmp_path / "plots-stale"
    plots_dir.mkdir()
    (plots_dir / "mine.png").write_bytes(b"not the report's")
    first = {p.name for p in plot_all([r for r in records if r["depth"] == 2], plots_dir)}
    assert "toy-gmm2d_quality_vs_steps_gamma0.png" in first
    second = {p.name for p in plot_all(records, plots_dir)}
    assert {p.name for p in plots_dir.glob("*.png")} == second | {"mine.png"}


def test_divergence_is_recorded_not_raised(tmp_path, capsys):
    cell = ToyCell("gmm2d", "resnet", 4, 0.0, 0, width=16, steps=300, batch_size=32, lr=1e4)
    result = cell.run(eval_n=50, sample_steps=3)
    assert result["diverged"] and result["diverged_step"] >= 1 and "quality" not in result
    healthy = ToyCell("gmm2d", "nrdm", 2, 0.0, 0, width=16, steps=3, batch_size=32)
    records = run_grid([cell, healthy], tmp_path / "r.jsonl", progress=False, eval_n=50, sample_steps=3)
    assert [r["diverged"] for r in records] == [True, False]     # the grid went on after the divergence
    assert json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])["key"] == cell.key
    lines = capsys.readouterr().out.splitlines()                 # one line per finished cell
    assert lines[0].startswith(f"[1/2] {cell.key}: diverged at step {records[0]['diverged_step']} (")
    assert lines[1].startswith(f"[2/2] {healthy.key}: energy distance") and "CPU-min)" in lines[1]


def test_shards_split_a_grid_exactly(tmp_path):
    cells = product(ToyCell, ["nrdm", "resnet", "rezero"], [2, 3], [0.0], [0, 1], dataset="gmm2d", width=8,
                    steps=2, batch_size=8)
    assert [c.depth for c in cells] == [2] * 6 + [3] * 6        # shallow depths first
    kwargs = dict(progress=False, eval_n=20, sample_steps=2)
    run_grid(cells, tmp_path / "r.jsonl", shard=(0, 2), **kwargs)
    first = {r["key"] for r in load_results(tmp_path / "r.jsonl")}
    assert first == {c.key for c in cells[0::2]}
    run_grid(cells, tmp_path / "r.jsonl", shard=(1, 2), **kwargs)
    keys = [r["key"] for r in load_results(tmp_path / "r.jsonl")]
    assert sorted(keys) == sorted(c.key for c in cells)         # every cell once
    with pytest.raises(ValueError, match="shard 2/2"):
        run_grid(cells, tmp_path / "r.jsonl", shard=(2, 2))
