"""The image proxy of the depth lab: a tiny grid through the real trainer writes its CSV and plots
and resumes; a diverging run is recorded with its step, not raised; the lab's own keys cannot be
overridden by mistake."""
import dataclasses
import functools
import json
from pathlib import Path

import pytest

import nrdm.training.trainer as trainer_mod
from nrdm.checkpoint import latest_checkpoint
from nrdm.config import load_config
from nrdm.cli import main as cli_main
from nrdm.lab.grid import load_results, run_grid
from nrdm.lab.image import ImageCell
from nrdm.lab.plots import study_cost
from nrdm.training.divergence import DivergenceMonitor

TINY = ("data.image_size=8", "sample.cfg_scale=1.0")
TINY_CELL = dict(width=16, heads=2, patch_size=2, steps=4, batch_size=8, overrides=TINY)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    # one domain network for the whole module (trained on first use), never the user's cache
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path_factory.getbasetemp() / "nrdm-cache"))


def test_tiny_image_grid_writes_csv_and_plots_and_resumes(tmp_path, capsys):
    args = ["lab", "image", "--out", str(tmp_path), "--variants", "nrdm", "resnet", "--depths", "1", "2",
            "--gammas", "0", "--steps", "4", "--batch-size", "8", "--width", "16", "--heads", "2",
            "--patch-size", "2", "--eval-n", "20", "--eval-points", "2", "--no-progress"]
    args += [a for o in TINY for a in ("--set", o)]
    assert cli_main(args) == 0
    records = load_results(tmp_path / "results.jsonl")
    assert len(records) == 4 and not any(r["diverged"] for r in records)
    for r in records:
        assert [p["step"] for p in r["curve"]] == [2, 4] and all(p["loss"] > 0 for p in r["curve"])
        assert 0 < r["curve"][0]["seconds"] < r["curve"][1]["seconds"] < r["seconds"]      # training time so far
        log = [json.loads(line) for line in (Path(r["run_dir"]) / "log.jsonl").read_text().splitlines()]
        assert (r["seconds"], r["cpu_seconds"]) == (log[-1]["wall_seconds"], log[-1]["cpu_seconds"])  # all invocations
        assert r["quality"] == r["curve"][-1]["quality"] == r["eval"]["fid"] and r["quality_floor"] >= 0
        assert len(r["sensitivity"]) >= 1 and all(len(v) == 2 * r["depth"] for v in r["sensitivity"].values())
        assert (tmp_path / "cells" / r["key"].replace("|", "_") / "samples").is_dir()
    nrdm = next(r for r in records if r["variant"] == "nrdm")
    assert set(nrdm["gates"]) == {"t", "alpha_mean", "beta_mean"}
    assert set(next(r for r in records if r["variant"] == "resnet")["gates"]) == {"t"}
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(csv) == 5 and all(line.startswith("digits-flow,") for line in csv[1:])
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"digits-flow_quality_vs_depth_gamma0.png", "digits-flow_gates_vs_time.png",      # two depths: the
            "digits-flow_quality_vs_time_gamma0.png", "digits-flow-d1_quality_vs_steps_gamma0.png",  # per-depth
            "digits-flow-d2_quality_vs_steps_gamma0.png", "digits-flow-d1_sensitivity_gamma0.png",   # plots
            "digits-flow-d2_sensitivity_gamma0.png"} <= plots                                        # say which
    out = capsys.readouterr().out
    assert "| digits-flow | resnet | 2 | 0 |" in out
    cpu_hours = sum(r["cpu_seconds"] for r in records) / 3600
    assert f"cost: {cpu_hours:.2f} CPU-process-hours" in out and "over 4/4 cells" in out
    summary = (tmp_path / "summary.md").read_text()
    accuracies = [r["eval"]["class_accuracy"] for r in records if r["variant"] == "resnet" and r["depth"] == 2]
    assert "class accuracy" in summary and f"| {accuracies[0]:.3f} +- 0.000 |" in summary
    mtime = (tmp_path / "results.jsonl").stat().st_mtime_ns
    assert cli_main(args) == 0                                    # all cells done: nothing re-run
    assert (tmp_path / "results.jsonl").stat().st_mtime_ns == mtime


def test_a_cell_killed_between_evaluations_resumes_from_a_later_checkpoint(tmp_path, monkeypatch):
    """A study process killed mid-cell loses at most a fraction of an evaluation interval, and the resumed
    cell ends where an uninterrupted one does."""
    cell = ImageCell("digits", "flow", "nrdm", 1, 0.0, 0, **{**TINY_CELL, "steps": 8})
    grid = dict(progress=False, eval_n=20, eval_points=2)                     # evaluations at steps 4 and 8
    (straight,) = run_grid([cell], tmp_path / "a.jsonl", cells_dir=tmp_path / "a", **grid)
    real_loss = trainer_mod.diffusion_loss
    calls = {"n": 0}

    def killed_in_step_8(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "diffusion_loss", killed_in_step_8)
    with pytest.raises(KeyboardInterrupt):
        run_grid([cell], tmp_path / "b.jsonl", cells_dir=tmp_path / "b", **grid)
    run_dir = tmp_path / "b" / cell.key.replace("|", "_")
    assert latest_checkpoint(run_dir).name == "step-00000007"                 # not step 4, the last evaluation
    monkeypatch.setattr(trainer_mod, "diffusion_loss", real_loss)
    (resumed,) = run_grid([cell], tmp_path / "b.jsonl", cells_dir=tmp_path / "b", **grid)
    drop_time = lambda curve: [{k: v for k, v in point.items() if k != "seconds"} for point in curve]
    assert drop_time(resumed["curve"]) == drop_time(straight["curve"])       # losses and quality at 4 and 8
    assert resumed["eval"] == straight["eval"]


def test_diverging_image_run_is_recorded_not_raised(tmp_path, monkeypatch):
    real_loss = trainer_mod.diffusion_loss

    def blow_up_from_step_3(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        blow_up_from_step_3.calls += 1
        if blow_up_from_step_3.calls >= 3:
            out.loss = out.loss * 1e3                             # finite, but far above the running minimum
        return out

    blow_up_from_step_3.calls = 0
    monkeypatch.setattr(trainer_mod, "diffusion_loss", blow_up_from_step_3)
    monkeypatch.setattr(trainer_mod, "DivergenceMonitor", functools.partial(DivergenceMonitor, grace_steps=1))
    cell = ImageCell("digits", "flow", "resnet", 1, 0.0, 0, **TINY_CELL)
    records = run_grid([cell], tmp_path / "r.jsonl", progress=False, cells_dir=tmp_path / "cells", eval_n=20,
                       eval_points=2)
    (r,) = records
    assert r["diverged"] and r["diverged_step"] == 3 and "diverged at step 3" in r["diverged_reason"]
    assert "quality" not in r and "gates" not in r


def test_lab_keys_cannot_be_overridden():
    cell = ImageCell("digits", "flow", "nrdm", 2, 0.0, 0, overrides=("train.steps=5",))
    with pytest.raises(ValueError, match="the lab sets these keys itself"):
        cell.config()
    assert ImageCell("digits", "flow", "nrdm", 2, 0.0, 0, overrides=("data.image_size=8",)).config().data.image_size == 8
    # a key that only starts like a lab key is the user's: train.lr is the lab's, train.lr_schedule not
    cosine = ImageCell("digits", "preset", "nrdm", 2, 0.0, 0, overrides=("train.lr_schedule=cosine",)).config()
    assert cosine.train.lr_schedule == "cosine"


def test_preset_cells_take_model_overrides_but_their_depth_and_variant():
    """A preset cell keeps the preset's model, so a model key other than the cell's own depth and
    variant is the user's (the DiMR ablation, gate sharing); a proxy cell builds its whole model."""
    ablation = ImageCell("digits-dimr", "preset", "nrdm", 5, 0.0, 0, overrides=("model.first_branch=convnext",))
    assert ablation.config().model.first_branch == "convnext"
    shared = ImageCell("digits-flow", "preset", "adaln-zero", 6, 0.0, 0, overrides=("model.gate_source=shared",))
    assert (shared.config().model.gate_source, shared.config().model.variant) == ("shared", "adaln-zero")
    for key in ("model.depth=3", "model.variant=resnet"):
        with pytest.raises(ValueError, match="the lab sets these keys itself.*--depths/--variants"):
            ImageCell("digits", "preset", "nrdm", 2, 0.0, 0, overrides=(key,)).config()
    with pytest.raises(ValueError, match="the lab sets these keys itself.*--width/--depth"):
        ImageCell("digits", "flow", "nrdm", 2, 0.0, 0, overrides=("model.gate_source=shared",)).config()


def test_cells_sample_with_the_study_protocol_whatever_the_preset_default(monkeypatch):
    """Every cell is scored with the study's sampler, also when a preset's sampling default
    changes (cells of a grid run sessions apart stay comparable); the guidance scale is the
    preset's, and the sampler keys are the lab's, not an override's."""
    import nrdm.lab.image as image_lab

    def preset_with_another_default(name, overrides=()):
        cfg = load_config(name, list(overrides))
        cfg.sample = dataclasses.replace(cfg.sample, sampler="unipc", steps=10, spacing="karras", cache_interval=2,
                                         guidance_interval=[0.3, 3.0], cfg_scale=2.5)
        return cfg

    monkeypatch.setattr(image_lab, "load_config", preset_with_another_default)
    for backbone, steps in (("preset", 25), ("flow", 20)):
        sample = ImageCell("digits", backbone, "nrdm", 2, 0.0, 0).config().sample
        assert (sample.sampler, sample.steps, sample.spacing) == ("dpm++2m", steps, "uniform")
        assert (sample.cache_interval, sample.guidance_interval, sample.cfg_rescale) == (1, None, 0.0)
        assert sample.cfg_scale == 2.5
    with pytest.raises(ValueError, match="the lab sets these keys itself"):
        ImageCell("digits", "preset", "nrdm", 2, 0.0, 0, overrides=("sample.sampler=heun",)).config()


def test_cells_train_the_plain_loss_unless_an_override_asks_for_an_option(monkeypatch):
    """A preset whose recipe has a faster loss (Min-SNR weights, logit-normal steps) still trains
    the study's plain loss in a cell, so the residual forms stay compared under one loss; a --set
    of those keys is the user's and measures the option."""
    import nrdm.lab.image as image_lab

    def preset_with_a_faster_loss(name, overrides=()):
        return load_config(name, ["diffusion.min_snr_gamma=5", "diffusion.timestep_sampling=logit-normal",
                                  *overrides])

    monkeypatch.setattr(image_lab, "load_config", preset_with_a_faster_loss)
    for backbone in ("preset", "flow"):
        plain = ImageCell("digits", backbone, "nrdm", 2, 0.0, 0).config().diffusion
        assert (plain.min_snr_gamma, plain.timestep_sampling) == (0, "uniform")
    option = ImageCell("digits", "preset", "nrdm", 2, 0.0, 0, overrides=("diffusion.min_snr_gamma=3",))
    assert (option.config().diffusion.min_snr_gamma, option.config().diffusion.timestep_sampling) == (3, "uniform")


def test_preset_cells_keep_the_presets_model_and_recipe():
    """backbone "preset": the preset's model (here the quickstart's conv U-Net) and lr, with the
    cell's variant and depth; the key names the preset, not a width or patch size."""
    cell = ImageCell("digits", "preset", "depth-mup", 8, 0.0, 1, steps=40)
    cfg = cell.config()
    preset = load_config("digits")
    assert (cfg.model.size, cfg.model.width, cfg.model.channel_mult) == (preset.model.size, preset.model.width,
                                                                           preset.model.channel_mult)
    assert (cfg.model.variant, cfg.model.depth, cfg.train.seed, cfg.train.steps) == ("depth-mup", 8, 1, 40)
    assert cfg.train.lr == preset.train.lr and cfg.sample.cfg_scale == preset.sample.cfg_scale
    assert cell.setting == "digits" and cell.key == "digits|depth-mup|d8|g0|s1|n40"


def test_study_cost_sums_the_cells_whose_logs_state_it():
    records = [{"seconds": 5400.0, "cpu_seconds": 3600.0}, {"seconds": 9000.0, "cpu_seconds": 7200.0},
               {"seconds": 60.0}]                                  # resumed from an older log: cost unknown
    assert study_cost(records) == ("cost: 3.00 CPU-process-hours, 4.00 process wall-clock hours, "
                                   "over 2/3 cells")
    assert study_cost(records[2:]) == "cost: no cell's log states its CPU time"
