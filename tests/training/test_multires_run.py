"""The multi-resolution backbone through the same trainer, checkpoints, samplers and CLI as the
others: train with the multi-resolution loss, exact resume, sample, evaluate; DDP and FSDP."""
import json

import pytest
import torch

from nrdm.cli import main as cli_main
from nrdm.training import load_checkpoint, latest_checkpoint

MULTIRES = ["model.size=DiMR-T/2R", "model.width=16", "model.depth=3", "model.heads=2", "model.branch_widths=[8]",
            "model.branch_depths=[1]",
            "model.variant=adaln", "model.gate_source=tdp", "diffusion.branch_weights=[0.25, 1]"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_multires_train_resume_sample_eval(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    overrides = tiny_overrides + MULTIRES + ["train.steps=4", "train.ckpt_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli_main(["train", "digits", "--out", str(straight), "--no-progress", *_sets(overrides)]) == 0
    halfway = [o.replace("train.steps=4", "train.steps=2") for o in overrides]
    assert cli_main(["train", "digits", "--out", str(resumed), "--no-progress", *_sets(halfway)]) == 0
    assert cli_main(["train", "digits", "--out", str(resumed), "--no-progress", "--resume", *_sets(overrides)]) == 0
    a, b = (load_checkpoint(latest_checkpoint(run)) for run in (straight, resumed))
    assert a["state"]["step"] == b["state"]["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    coarse_head = "branches.0.head.weight"
    assert a["model"][coarse_head].abs().sum() > 0                   # the coarse head is trained by its loss term

    out = tmp_path / "s.png"
    assert cli_main(["sample", str(straight), "--n", "4", "--steps", "2", "--out", str(out), "--sampler", "dpm++2m",
                     "--cache-interval", "2"]) == 0
    assert out.exists()
    result = tmp_path / "eval.json"
    assert cli_main(["eval", str(straight), "--n", "10", "--steps", "2", "--json", str(result),
                     "--domain-epochs", "1"]) == 0
    assert json.loads(result.read_text())["metrics"]["fid"] >= 0


def test_branch_weights_need_the_multires_backbone(tmp_path, tiny_overrides, capsys):
    sets = _sets(tiny_overrides + ["diffusion.branch_weights=[0.25, 1]"])
    assert cli_main(["train", "digits", "--out", str(tmp_path / "x"), "--no-progress", *sets]) == 2
    assert "needs model.backbone=multires" in capsys.readouterr().err


@pytest.mark.parametrize("parallel,weights", [("ddp", "null"), ("fsdp", "[0.25, 1]")])
def test_multires_on_two_processes(tmp_path, tiny_overrides, torchrun, parallel, weights):
    """Without the multi-resolution loss the coarse heads get no gradient: DDP must not wait for them."""
    overrides = tiny_overrides + MULTIRES + ["train.steps=2", "train.ckpt_every=2", "train.device=cpu",
                                             f"train.parallel={parallel}", f"diffusion.branch_weights={weights}"]
    torchrun(["train", "digits", "--out", tmp_path / "run", "--no-progress", *_sets(overrides)])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2 and all(r.get("loss", 0) == r.get("loss", 0) for r in log)
