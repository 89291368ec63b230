"""The training loop end to end on tiny configs: exact resume, DDP equivalence, non-finite
steps, and the CLI."""
import functools
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nrdm.training.trainer as trainer_mod
from nrdm.cli import main as cli_main
from nrdm.training import TrainingStopped, load_checkpoint, latest_checkpoint, train
from nrdm.training.divergence import DivergenceMonitor


def final_state(run):
    loaded = load_checkpoint(latest_checkpoint(run))
    return loaded["model"], loaded["ema"], loaded["state"]["optimizer"]


def assert_same_state(a, b):
    model_a, ema_a, opt_a = a
    model_b, ema_b, opt_b = b
    for sa, sb in [(model_a, model_b), (ema_a, ema_b)]:
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    for pid, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][pid][key]), (pid, key)


def per_unit_moments(state, cfg):
    """A model.fused_gates run's final state with the fused head's optimizer moments split into
    the per-unit heads' names (its weights are saved in the per-unit layout already)."""
    from nrdm.factory import build_model_from_config
    heads = build_model_from_config(cfg).embed.fused_gates
    model, ema, optimizer = state
    for kind in ("weight", "bias"):
        fused = optimizer["state"].pop(f"embed.fused_gates.linear.{kind}")
        for i, name in enumerate(heads.names):
            optimizer["state"][f"{name}.head.{kind}"] = {key: value.split(heads.sizes)[i] if value.dim() else value
                                                          for key, value in fused.items()}
    return model, ema, optimizer


def assert_same_training(a, b, lr: float, steps: int):
    """Two runs that differ only in float rounding (another summation order of the all-reduce).
    Gradients agree: Adam's first moments within 1e-4 of the largest one. Parameters lie within
    a fifth of one Adam step (lr) wherever the gradient is signal; where it is rounding noise
    (|m| below 1e-4 of the largest, e.g. a bias in front of a norm), Adam's m / sqrt(v) turns the
    noise's sign into a full step, so those elements are only bounded by the steps taken."""
    (model_a, ema_a, opt_a), (model_b, ema_b, opt_b) = a, b
    assert model_a.keys() == model_b.keys() and opt_a["state"].keys() == opt_b["state"].keys()
    scale = max(float(state["exp_avg"].abs().max()) for state in opt_a["state"].values())
    for name, state in opt_a["state"].items():
        m_a, m_b = state["exp_avg"], opt_b["state"][name]["exp_avg"]
        gap = float((m_a - m_b).abs().max())
        assert gap <= 1e-4 * scale, f"{name}: first moments differ by {gap:.3g} (largest moment {scale:.3g})"
        signal = m_a.abs() > 1e-4 * scale
        for sa, sb in [(model_a, model_b), (ema_a, ema_b)]:
            diff = (sa[name] - sb[name]).abs()
            worst = float((diff * signal).max())
            assert worst <= 0.2 * lr, f"{name}: {worst}"
            assert diff.max() <= 2 * lr * steps, name


class Interrupt(Exception):
    pass


def interrupt_at_call(monkeypatch, module, name: str, call: int):
    """Make `module.name` raise Interrupt on its `call`-th call; returns the real function."""
    real = getattr(module, name)
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupting)
    return real


def test_resume_is_bit_identical(tiny_config, tmp_path, monkeypatch):
    """6 steps straight vs. 3 steps + crash in step 5 + resume: same model, EMA and optimizer.
    Dropout, label dropout, flips, accumulation and the penalty all draw randomness."""
    extra = ["model.dropout=0.1", "data.hflip=true", "train.grad_accum=2", "diffusion.gamma=0.01",
             "train.ckpt_every=3", "train.keep_last=5"]
    cfg = tiny_config(*extra)
    train(cfg, tmp_path / "straight", progress=False)

    # crash in the first micro-batch of step 5 (2 micro-batches per step)
    real_loss = interrupt_at_call(monkeypatch, trainer_mod, "diffusion_loss", 2 * 4 + 1)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(trainer_mod, "diffusion_loss", real_loss)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000003"
    with pytest.raises(ValueError, match="pass --resume"):
        train(cfg, tmp_path / "resumed", progress=False)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
    steps = [json.loads(line).get("step") for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(4) == 1            # no duplicate records after resume


def test_an_evaluation_lost_to_a_stop_is_made_on_resume(tiny_config, tmp_path, monkeypatch):
    """A stop after step 4's checkpoint but during its evaluation: the resumed run evaluates step 4
    first and gets what the uninterrupted run got (the same EMA weights and sampling seeds)."""
    evaluate_mod = importlib.import_module("nrdm.metrics.evaluate")      # the module, not nrdm.metrics' function
    cfg = tiny_config("train.steps=6", "train.ckpt_every=2", "train.eval_every=2", "train.eval_n=10")
    train(cfg, tmp_path / "straight", progress=False)

    real_evaluate = interrupt_at_call(monkeypatch, evaluate_mod, "evaluate", 2)     # stop in step 4's evaluation
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(evaluate_mod, "evaluate", real_evaluate)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000004"
    train(cfg, tmp_path / "resumed", resume=True, progress=False)

    def evaluations(run):
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["eval"]) for r in records if "eval" in r]

    assert [step for step, _ in evaluations(tmp_path / "resumed")] == [2, 4, 6]
    assert evaluations(tmp_path / "resumed") == evaluations(tmp_path / "straight")


def install_ticking_clock(monkeypatch):
    """A fake RunClock that advances 1 wall and 0.5 CPU second per loss call; returns that loss."""
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(trainer_mod.RunClock, "timers", (lambda: clock["wall"], lambda: clock["cpu"]))
    real_loss = trainer_mod.diffusion_loss

    def ticking_loss(*args, **kwargs):
        clock["wall"] += 1.0
        clock["cpu"] += 0.5
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "diffusion_loss", ticking_loss)
    return ticking_loss


def test_the_logged_cost_of_a_resumed_run_counts_each_step_once(tiny_config, tmp_path, monkeypatch):
    """With the ticking clock: a run stopped in step 5 and resumed from step 3's checkpoint costs what
    the straight run does (steps 4 and 5 of the stopped process are redone, and counted once);
    resumed from a checkpoint and a log that do not state its cost (older versions), it leaves the
    cost out rather than restart it at zero."""
    ticking_loss = install_ticking_clock(monkeypatch)

    def costs(run):
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("wall_seconds"), r.get("cpu_seconds")) for r in records]

    cfg = tiny_config("train.steps=6", "train.ckpt_every=3", "train.log_every=1")
    train(cfg, tmp_path / "straight", progress=False)
    assert costs(tmp_path / "straight") == [(0, 0.0, 0.0)] + [(s, float(s), s / 2) for s in range(1, 7)]

    interrupt_at_call(monkeypatch, trainer_mod, "diffusion_loss", 5)          # in step 5
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(trainer_mod, "diffusion_loss", ticking_loss)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert costs(tmp_path / "resumed") == costs(tmp_path / "straight")

    log = tmp_path / "resumed" / "log.jsonl"                   # an older version's log and checkpoint
    records = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.endswith("_seconds")}) + "\n"
                           for r in records))
    state_file = latest_checkpoint(tmp_path / "resumed") / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state.pop("clock") == {"wall_seconds": 6.0, "cpu_seconds": 3.0}
    torch.save(state, state_file)
    train(tiny_config("train.steps=8", "train.ckpt_every=3", "train.log_every=1"), tmp_path / "resumed",
          resume=True, progress=False)
    assert [c for c in costs(tmp_path / "resumed") if c[0] > 6] == [(7, None, None), (8, None, None)]


def test_a_resume_between_two_log_records_logs_what_the_straight_run_logs(tiny_config, tmp_path, monkeypatch):
    """Checkpoint at step 3, log records at steps 4 and 6, a stop in step 5: the resumed run's record
    at step 4 averages the loss of steps 1-4 and states the cost of steps 1-4, as the straight run's
    does (the checkpoint carries the loss sums and the cost since the last record)."""
    ticking_loss = install_ticking_clock(monkeypatch)

    def records(run):
        lines = (run / "log.jsonl").read_text().splitlines()
        return [{k: r.get(k) for k in ("step", "loss", "mse", "wall_seconds", "cpu_seconds")}
                for r in map(json.loads, lines) if "loss" in r]

    cfg = tiny_config("train.steps=6", "train.ckpt_every=3", "train.log_every=4")
    train(cfg, tmp_path / "straight", progress=False)
    assert [(r["step"], r["wall_seconds"]) for r in records(tmp_path / "straight")] == [(4, 4.0), (6, 6.0)]
    interrupt_at_call(monkeypatch, trainer_mod, "diffusion_loss", 5)          # in step 5
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "resumed", progress=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000003"
    monkeypatch.setattr(trainer_mod, "diffusion_loss", ticking_loss)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")


def test_resume_refuses_a_changed_model(tiny_config, tmp_path):
    train(tiny_config("train.steps=3"), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"model.variant: 'nrdm' -> 'resnet'"):
        train(tiny_config("train.steps=6", "model.variant=resnet"), tmp_path, resume=True, progress=False)
    train(tiny_config("train.steps=6"), tmp_path, resume=True, progress=False)      # more steps: allowed
    assert latest_checkpoint(tmp_path).name == "step-00000006"


def test_resume_allows_changes_that_do_not_change_results(tiny_config, tmp_path):
    """Compilation, activation recomputation, the device and the data's location may change on
    resume; the model's shape may not."""
    train(tiny_config("train.steps=2"), tmp_path, progress=False)
    saved = (tmp_path / "config.yaml").read_text()
    trainer_mod.check_resume_config(saved, tiny_config("train.compile=true", "model.grad_checkpointing=true",
                                                       "train.device=cpu", "data.root=/elsewhere"))
    with pytest.raises(ValueError, match=r"model.width: 8 -> 16"):
        trainer_mod.check_resume_config(saved, tiny_config("model.width=16"))
    train(tiny_config("train.steps=4", "model.grad_checkpointing=true"), tmp_path, resume=True, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-00000004"


def test_channels_last_trains_nhwc_and_computes_the_same(tiny_config, tmp_path, monkeypatch):
    """train.channels_last on RGB images: the conv U-Net's weights and every batch (images and
    noise) are NHWC during training, the result equals the NCHW run up to the convs' rounding, and
    the checkpoint resumes in NCHW."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):                                   # RGB images with no symmetry
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    rgb = ("data.name=folder", f"data.root={tmp_path / 'data'}")
    train(tiny_config(*rgb), tmp_path / "nchw", progress=False)
    seen = []
    real_loss = trainer_mod.diffusion_loss

    def checking_loss(model, x, condition, schedule, loss_cfg, **kwargs):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
                    and m.kernel_size[0] > 1)
        nhwc = torch.channels_last
        seen.append((x.shape[1] == 3, x.is_contiguous(memory_format=nhwc),
                     kwargs["draws"].noise.is_contiguous(memory_format=nhwc),
                     conv.weight.is_contiguous(memory_format=nhwc) and not conv.weight.is_contiguous()))
        return real_loss(model, x, condition, schedule, loss_cfg, **kwargs)

    monkeypatch.setattr(trainer_mod, "diffusion_loss", checking_loss)
    train(tiny_config(*rgb, "train.channels_last=true"), tmp_path / "nhwc", progress=False)
    assert seen and all(all(s) for s in seen), seen
    assert_same_training(final_state(tmp_path / "nchw"), final_state(tmp_path / "nhwc"), tiny_config().train.lr, 6)
    train(tiny_config(*rgb, "train.steps=8"), tmp_path / "nhwc", resume=True, progress=False)    # back to NCHW
    assert latest_checkpoint(tmp_path / "nhwc").name == "step-00000008"


def test_fused_gates_train_as_the_per_unit_heads(tiny_config, tmp_path):
    """model.fused_gates: a flow model trains as with per-unit gate heads (up to the rounding of
    the conditioning's summed gradient), writes checkpoints in the per-unit layout that an
    unfused model loads, and resumes; switching it on a resume is refused (its optimizer state
    is keyed by the fused parameter)."""
    from nrdm.factory import build_model_from_config
    flow = ["model.size=DiT-T/2", "model.width=16", "model.heads=2", "model.depth=2", "model.variant=adaln-zero"]
    train(tiny_config(*flow), tmp_path / "per-unit", progress=False)
    train(tiny_config(*flow, "model.fused_gates=true"), tmp_path / "fused", progress=False)
    fused = per_unit_moments(final_state(tmp_path / "fused"), tiny_config(*flow, "model.fused_gates=true"))
    assert_same_training(final_state(tmp_path / "per-unit"), fused, tiny_config().train.lr, 6)
    build_model_from_config(tiny_config(*flow)).load_state_dict(fused[0])          # strict
    train(tiny_config(*flow, "model.fused_gates=true", "train.steps=8"), tmp_path / "fused", resume=True, progress=False)
    assert latest_checkpoint(tmp_path / "fused").name == "step-00000008"
    with pytest.raises(ValueError, match="model.fused_gates"):
        train(tiny_config(*flow, "train.steps=10"), tmp_path / "fused", resume=True, progress=False)


def test_a_run_that_fails_at_once_leaves_no_directory(tiny_config, tmp_path):
    """A run that fails before writing anything but its config removes the directory it made;
    a directory the user made stays."""
    bad = ("data.name=mnist", f"data.root={tmp_path / 'no-such-mnist'}")
    with pytest.raises((ValueError, FileNotFoundError)):
        train(tiny_config(*bad), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises((ValueError, FileNotFoundError)):
        train(tiny_config(*bad), tmp_path / "mine", progress=False)
    assert (tmp_path / "mine").is_dir()


def test_fsdp_without_fully_shard_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_fsdp2(name, *args, **kwargs):
        if name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fsdp2)
    with pytest.raises(ValueError, match="train.parallel=fsdp needs FSDP2's fully_shard"):
        trainer_mod._wrap_parallel(torch.nn.Linear(2, 2), "fsdp", None)


def test_non_finite_steps_are_skipped_then_stop(tiny_config, tmp_path, monkeypatch):
    real_loss = trainer_mod.diffusion_loss
    bad_calls = {2}

    def nan_loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        nan_loss.calls += 1
        if nan_loss.calls in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    nan_loss.calls = 0
    monkeypatch.setattr(trainer_mod, "diffusion_loss", nan_loss)
    summary = train(tiny_config(), tmp_path / "once", progress=False)
    records = [json.loads(line) for line in (tmp_path / "once" / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["step"] == 2 and skipped[0]["loss"] == "nan"
    assert summary["steps"] == 6 and all(torch.isfinite(v).all() for v in final_state(tmp_path / "once")[0].values())

    nan_loss.calls = 0
    bad_calls.update(range(1, 100))
    with pytest.raises(TrainingStopped, match=r"training stopped at step 3: 3 consecutive steps had a non-finite"):
        train(tiny_config("train.max_bad_steps=3"), tmp_path / "always", progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_with_the_penalty(tiny_config, tmp_path, precision):
    """Autocast (bf16, or fp16 with loss scaling) with the sensitivity penalty on the conv U-Net:
    every step finite, the penalty logged and positive once the gates have moved."""
    train(tiny_config(f"train.precision={precision}", "diffusion.gamma=0.5", "diffusion.penalty_units=3",
                      "train.steps=4", "train.log_every=1"), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][1:]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and not any(r.get("skipped") for r in records)
    assert all(isinstance(r["loss"], float) and isinstance(r["penalty"], float) for r in records)
    assert records[-1]["penalty"] > 0


def test_diagnostics_are_logged(tiny_config, tmp_path):
    train(tiny_config("train.diagnostics_every=3", "train.steps=3"), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    diag = [r["diagnostics"] for r in records if "diagnostics" in r]
    assert len(diag) == 1
    n_units = len(diag[0]["unit_variant"])
    assert n_units > 0 and len(diag[0]["adjoint_norm"]) == n_units
    assert all(isinstance(v, float) for v in diag[0]["adjoint_norm"])


@pytest.mark.parametrize("parallel,gamma,option", [("ddp", 0.0, "nchw"), ("fsdp", 0.0, "nchw"), ("ddp", 0.5, "nchw"),
                                                   ("fsdp", 0.5, "nchw"), ("ddp", 0.0, "nhwc"), ("ddp", 0.5, "fused")])
def test_two_processes_match_one(tiny_config, tiny_overrides, tmp_path, torchrun, parallel, gamma, option):
    """torchrun, 2 CPU processes with gloo, global batch 16 = 2 x 8, against 1 process x 16;
    DDP replicates the model, FSDP shards it (and the checkpoint is gathered unsharded). With
    gamma > 0 the sensitivity penalty runs too (under FSDP on gathered parameters), with the
    same units and per-sample probes as in one process. DDP also reduces the gradients of NHWC
    conv weights (train.channels_last) and of the fused gate head (model.fused_gates, against
    per-unit heads in one process) to the same result."""
    overrides = ["train.steps=3", "train.ckpt_every=3", "train.device=cpu", f"diffusion.gamma={gamma}",
                 "diffusion.penalty_units=2", f"train.parallel={parallel}"]
    train(tiny_config(*overrides[:-1]), tmp_path / "one", progress=False)
    extra = {"nchw": [], "nhwc": ["train.channels_last=true"], "fused": ["model.fused_gates=true"]}[option]
    sets = tiny_overrides + overrides + extra
    torchrun(["train", "digits", "--out", tmp_path / "two", "--no-progress", *(a for item in sets for a in ("--set", item))])
    # Same losses and gradient norms to float precision; gradients and parameters as in
    # assert_same_training.
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert logs[1][0]["world_size"] == 2
    for a, b in zip(logs[0][1:], logs[1][1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    two = final_state(tmp_path / "two")
    if option == "fused":
        two = per_unit_moments(two, tiny_config(*extra))
    assert_same_training(final_state(tmp_path / "one"), two, lr=1e-3, steps=3)


def test_cli_train_sample_info(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    sets = [arg for item in tiny_overrides + ["train.steps=2"] for arg in ("--set", item)]
    assert cli_main(["train", "--out", str(run), "--no-progress", *sets]) == 2          # no preset given
    assert cli_main(["train", "digits", "--out", str(run), "--no-progress", *sets]) == 0
    assert (run / "samples" / "step-00000002.png").exists()
    out_png = tmp_path / "grid.png"
    assert cli_main(["sample", str(run), "--n", "4", "--out", str(out_png), "--steps", "2", "--class", "3"]) == 0
    from PIL import Image
    assert Image.open(out_png).size[0] > 0
    capsys.readouterr()
    assert cli_main(["info", str(run)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 2 and info["params"] > 0 and info["gflops_per_sample"] > 0
    assert cli_main(["train", "digits", "--out", str(tmp_path / "x"), "--set", "train.stpes=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    assert cli_main(["sample", str(tmp_path / "empty"), "--out", str(out_png)]) == 2
    assert cli_main(["sample", str(run), "--prompt", "a seven", "--out", str(out_png)]) == 2
    assert "--prompt needs a text-to-image model" in capsys.readouterr().err


N_FLAG = "-n/--n/--num-samples"        # -n for torchrun, whose own options take --n as an abbreviation


@pytest.mark.parametrize("argv,flag", [(["sample", "RUN", "--n", "-3", "--out", "x.png"], N_FLAG),
                                       (["sample", "RUN", "--n", "0", "--out", "x.png"], N_FLAG),
                                       (["sample", "RUN", "--out", "x.png", "--steps", "0"], "--steps"),
                                       (["eval", "RUN", "--n", "0"], N_FLAG), (["eval", "RUN", "--n", "ten"], N_FLAG)])
def test_cli_rejects_counts_below_one(argv, flag, capsys):
    """--n / --steps below 1 are usage errors naming the flag, before any run is loaded (they
    used to end in a torch traceback or an obscure torch.cat() message)."""
    with pytest.raises(SystemExit) as stop:
        cli_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and ("must be at least 1" in err or "expected a whole number" in err)
    assert f"argument {flag}:" in err


def test_divergence_monitor():
    monitor = DivergenceMonitor(factor=10, grace_steps=2)
    assert not any(monitor.diverged(s, loss) for s, loss in [(1, 5.0), (2, 100.0), (3, 1.0), (4, 9.9)])
    assert monitor.running_min == 1.0 and monitor.diverged(5, 10.1)
    assert DivergenceMonitor().diverged(1, float("nan"))
    with pytest.raises(ValueError, match="must be > 1"):
        DivergenceMonitor(factor=1)


def test_divergence_stops_training_with_its_step(tiny_config, tmp_path, monkeypatch):
    real_loss = trainer_mod.diffusion_loss

    def blow_up(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        blow_up.calls += 1
        out.loss = out.loss * (1e3 if blow_up.calls >= 4 else 1.0)
        return out

    blow_up.calls = 0
    monkeypatch.setattr(trainer_mod, "diffusion_loss", blow_up)
    monkeypatch.setattr(trainer_mod, "DivergenceMonitor", functools.partial(DivergenceMonitor, grace_steps=1))
    with pytest.raises(TrainingStopped, match="training diverged at step 4") as stop:
        train(tiny_config("train.divergence_factor=10"), tmp_path, progress=False)
    assert stop.value.step == 4
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[-1]["diverged"] and records[-1]["step"] == 4


def test_lr_schedules_closed_form(tiny_config):
    """Linear warm-up over w steps, then constant or cosine from lr to min_lr at train.steps."""
    import math
    const = tiny_config("train.steps=1000", "train.warmup_steps=100").train
    cosine = tiny_config("train.steps=1000", "train.warmup_steps=100", "train.lr_schedule=cosine",
                         "train.min_lr=1e-4").train
    for tc in (const, cosine):
        assert [trainer_mod.lr_factor(tc, s) for s in (0, 49, 98)] == pytest.approx([0.01, 0.5, 0.99])
    assert trainer_mod.lr_factor(const, 999) == 1.0
    floor = 1e-4 / cosine.lr
    for s in (99, 324, 549, 999):
        progress = (s + 1 - 100) / 900
        assert trainer_mod.lr_factor(cosine, s) == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)
    assert trainer_mod.lr_factor(cosine, 549) == pytest.approx((1 + floor) / 2)
    with pytest.raises(ValueError, match="allowed: constant, cosine"):
        trainer_mod.validate(tiny_config("train.lr_schedule=step"))


def test_training_options_reach_the_loop(tiny_config, tmp_path):
    """Min-SNR weighting, logit-normal steps and the cosine schedule run end to end; the logged
    lr follows the cosine."""
    train(tiny_config("diffusion.min_snr_gamma=5", "diffusion.timestep_sampling=logit-normal",
                      "train.lr_schedule=cosine", "train.log_every=1"), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][1:]
    lrs = [r["lr"] for r in records]
    assert lrs[-1] < lrs[2] and all(isinstance(r["loss"], float) for r in records)


def test_init_from_starts_a_new_run_from_another_runs_weights(tiny_config, tmp_path):
    """A deeper flow model from a shallower run: shared tensors = the source's EMA, the extra block
    keeps its (identity) initialisation, the run starts at step 0 with its own optimizer; a source
    of another width is refused with what does not fit."""
    flow = ["model.size=DiT-T/2", "model.width=16", "model.heads=2", "model.variant=adaln-zero"]
    train(tiny_config(*flow, "model.depth=2", "train.steps=3"), tmp_path / "source", progress=False)
    source_ema = load_checkpoint(latest_checkpoint(tmp_path / "source"))["ema"]
    cfg = tiny_config(*flow, "model.depth=3", "train.steps=1", "train.lr=0", "train.ckpt_every=1",
                      f"train.init_from={tmp_path / 'source'}")
    train(cfg, tmp_path / "deeper", progress=False)
    loaded = load_checkpoint(latest_checkpoint(tmp_path / "deeper"))
    assert loaded["state"]["step"] == 1 and latest_checkpoint(tmp_path / "deeper").name == "step-00000001"
    for key, value in source_ema.items():
        assert torch.equal(loaded["model"][key], value), key
    fresh = [k for k in loaded["model"] if k.startswith("blocks.2.")]
    assert fresh and all(loaded["model"][k].abs().sum() == 0 for k in fresh if "gates.head" in k)   # identity
    wider = tiny_config(*flow, "model.width=32", "model.depth=2", f"train.init_from={tmp_path / 'source'}")
    with pytest.raises(Exception, match="do not fit this model.*of another shape"):
        train(wider, tmp_path / "wider", progress=False)


def test_nrdm_plot_overlays_runs(tiny_config, tmp_path, capsys):
    """Two runs (one with diagnostics) -> training.png with two lines per panel and sensitivity.png;
    a directory without a log is a clear error."""
    train(tiny_config("train.steps=4"), tmp_path / "a", progress=False)
    train(tiny_config("train.steps=4", "train.diagnostics_every=2", "model.variant=resnet"), tmp_path / "b",
          progress=False)
    import matplotlib.pyplot as plt
    seen = []
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kw):
        seen.append((Path(path).name, [len(ax.get_lines()) for ax in fig.axes]))
        return real_savefig(fig, path, **kw)

    plt.Figure.savefig = spy
    try:
        assert cli_main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "plots")]) == 0
    finally:
        plt.Figure.savefig = real_savefig
    lines = dict(seen)
    assert lines["training.png"] == [2, 2, 2] and lines["sensitivity.png"] == [1]
    assert (tmp_path / "plots" / "training.png").stat().st_size > 0
    assert cli_main(["plot", str(tmp_path), "--out", str(tmp_path / "p2")]) == 2
    assert "has no log.jsonl" in capsys.readouterr().err
