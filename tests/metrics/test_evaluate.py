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


def test_streamed_features_equal_the_one_shot_metrics(tiny_config, cache):
    """Features taken batch by batch (running statistics, spatial features not kept) give the
    metrics of the whole set at once."""
    import importlib

    import numpy as np
    import torch

    from nrdm.data.datasets import load_digits_dataset
    ev = importlib.import_module("nrdm.metrics.evaluate")
    net = ev.feature_network(tiny_config().data, domain_epochs=1, progress=False)
    images = load_digits_dataset(8).images
    real, fake = images[:300], images[300:500]
    whole = net(fake)                                                # all 200 at once
    streamed = ev.extract(net, fake, batch_size=37)
    assert "spatial" not in streamed and streamed["pool"].shape == whole["pool"].shape
    labels = torch.arange(200) % 10
    one_shot = ev.compute_metrics(net(real), whole, labels.numpy())
    batched = ev.compute_metrics(ev.extract(net, real, batch_size=64), streamed, labels.numpy())
    assert set(one_shot) == set(batched) >= {"fid", "sfid", "kid", "precision", "recall", "class_accuracy"}
    for key in one_shot:
        assert batched[key] == pytest.approx(one_shot[key], rel=1e-6, abs=1e-9), key


def test_eval_of_a_sample_npz_against_an_adm_reference_file(tiny_config, tmp_path, cache):
    """An ADM-style reference batch (arr_0 uint8 NHWC) built by the test; the samples an .npz;
    a statistics-only reference (mu, sigma, mu_s, sigma_s) gives the same FID and sFID."""
    import numpy as np

    from nrdm.data.datasets import load_digits_dataset
    from nrdm.utils.images import to_uint8
    run = tmp_path / "run"
    train(tiny_config("train.steps=2"), run, progress=False)
    digits = load_digits_dataset(8)
    images, labels = digits.images, digits.labels[400:600].numpy()
    np.savez(tmp_path / "ref.npz", arr_0=to_uint8(images[:400]))
    np.savez(tmp_path / "samples.npz", arr_0=to_uint8(images[400:600]), arr_1=labels)
    out = tmp_path / "m.json"
    args = ["eval", str(run), "--samples", str(tmp_path / "samples.npz"), "--ref-stats", str(tmp_path / "ref.npz"),
            "--json", str(out), "--domain-epochs", "1"]
    assert cli_main(args) == 0
    result = json.loads(out.read_text())
    metrics, protocol = result["metrics"], result["protocol"]
    assert protocol["n_fake"] == 200 and protocol["n_real"] == 400 and len(protocol["reference_sha256"]) == 64
    # the same computed from the in-memory images
    import importlib
    ev = importlib.import_module("nrdm.metrics.evaluate")
    net = ev.feature_network(tiny_config().data, domain_epochs=1, progress=False)
    from nrdm.utils.images import from_uint8
    direct = ev.compute_metrics(ev.extract(net, from_uint8(to_uint8(images[:400]))),
                                ev.extract(net, from_uint8(to_uint8(images[400:600]))), labels)
    for key in ("fid", "sfid", "kid", "precision", "recall", "class_accuracy"):
        assert metrics[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), key
    real = ev.reference_from_file(tmp_path / "ref.npz", net)[0]
    np.savez(tmp_path / "stats.npz", mu=real["pool_mu"], sigma=real["pool_sigma"], mu_s=real["spatial_mu"],
             sigma_s=real["spatial_sigma"])
    assert cli_main([*args[:4], "--ref-stats", str(tmp_path / "stats.npz"), "--json", str(out),
                     "--domain-epochs", "1"]) == 0
    stats_only = json.loads(out.read_text())["metrics"]
    assert stats_only["fid"] == pytest.approx(metrics["fid"], rel=1e-9)
    assert stats_only["sfid"] == pytest.approx(metrics["sfid"], rel=1e-9) and "kid" not in stats_only
    # images and statistics (ADM's layout): the stored statistics give FID, the images KID / recall
    other = ev.extract(net, images[600:1000])
    np.savez(tmp_path / "both.npz", arr_0=to_uint8(images[:400]), mu=other["pool_mu"], sigma=other["pool_sigma"])
    assert cli_main([*args[:4], "--ref-stats", str(tmp_path / "both.npz"), "--json", str(out),
                     "--domain-epochs", "1"]) == 0
    both = json.loads(out.read_text())["metrics"]
    assert both["kid"] == pytest.approx(metrics["kid"]) and both["recall"] == pytest.approx(metrics["recall"])
    samples = ev.extract(net, from_uint8(to_uint8(images[400:600])))
    assert both["fid"] == pytest.approx(ev.compute_metrics(other, samples)["fid"], rel=1e-6)
    assert both["fid"] != pytest.approx(metrics["fid"], rel=1e-3)
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    assert cli_main([*args[:4], "--ref-stats", str(tmp_path / "bad.npz")]) == 2


def test_two_processes_evaluate_like_one(tiny_config, tmp_path, cache, torchrun):
    run = tmp_path / "run"
    train(tiny_config("train.steps=2"), run, progress=False)
    common = ["eval", run, "-n", "30", "--batch-size", "4", "--steps", "2", "--domain-epochs", "1"]
    assert cli_main([*map(str, common), "--json", str(tmp_path / "one.json")]) == 0
    torchrun([*common, "--json", tmp_path / "two.json", "--device", "cpu"])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("one", "two"))
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key      # thread counts differ: float noise
