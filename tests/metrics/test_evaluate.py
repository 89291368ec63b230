"""nrdm eval end to end on a tiny run: metrics present, full protocol in the JSON, reference
statistics cached; evaluation during training lands in the JSONL log."""
import json

import pytest

from nrdm.cli import main as cli_main
from nrdm.training import train

PROTOCOL_FIELDS = ["dataset", "split", "image_size", "n_real", "n_fake", "feature_network", "feature_network_sha256",
                   "sampler", "steps", "nfe", "cfg_scale", "seed", "nrdm_version", "git_commit", "torch_version",
                   "checkpoint", "step", "weights", "kid_subset_size", "precision_recall_k"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_eval_writes_metrics_and_protocol(tiny_config, tmp_path, cache, capsys):
    run = tmp_path / "run"
    train(tiny_config("train.steps=2"), run, progress=False)
    out = tmp_path / "metrics.json"
    args = ["eval", str(run), "--n", "30", "--json", str(out), "--steps", "2", "--cfg", "2", "--domain-epochs", "1"]
    assert cli_main(args) == 0
    result = json.loads(out.read_text())
    for key in ["fid", "kid", "kid_std", "precision", "recall", "sfid", "is", "is_std", "class_accuracy"]:
        assert isinstance(result["metrics"][key], float), key
    protocol = result["protocol"]
    for key in PROTOCOL_FIELDS:
        assert key in protocol, key
    assert protocol["n_fake"] == 30 and protocol["split"] == "test" and protocol["nfe"] == 4
    assert protocol["weights"] == "ema" and protocol["step"] == 2 and len(protocol["feature_network_sha256"]) == 64
    assert "fid" in capsys.readouterr().out
    cached = list((cache / "ref-stats").iterdir())
    assert len(cached) == 1 and protocol["feature_network_sha256"][:16] in cached[0].name
    assert cli_main(args) == 0                                       # second time: cached reference reused
    assert json.loads(out.read_text())["metrics"]["fid"] == pytest.approx(result["metrics"]["fid"])


def test_evaluation_during_training_is_logged(tiny_config, tmp_path, cache):
    train(tiny_config("train.steps=2", "train.eval_every=2", "train.eval_n=20"), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert {"fid", "kid", "precision", "recall", "class_accuracy"} <= set(evals[0]["eval"])
    assert evals[0]["eval_protocol"]["n_fake"] == 20
