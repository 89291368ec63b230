"""Generating sample sets: rank-independent chunks and noise (the same .npz for any number of
processes), resumable chunk files, grids of many-class models, and every module that touches a
sample (autoencoder, text encoder, feature network) on the model's device."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from nrdm.cli import main as cli_main
from nrdm.config import load_config
from nrdm.models.autoencoder import LatentCodec
from nrdm.sampling import chunks, initial_noise, sample_conditions, save_samples
from nrdm.training import train


def test_chunks_cover_every_sample_once_for_any_world_size():
    for world in (1, 2, 3, 5):
        got = sorted(c for rank in range(world) for c in chunks(23, 4, rank, world))
        assert got == chunks(23, 4) and chunks(23, 4)[-1] == (20, 23)


def test_initial_noise_of_a_sample_does_not_depend_on_its_batch():
    whole = initial_noise((1, 4, 4), seed=3, start=0, stop=10)
    torch.testing.assert_close(initial_noise((1, 4, 4), 3, 6, 10), whole[6:])
    assert not torch.allclose(initial_noise((1, 4, 4), 4, 0, 10), whole)          # another seed
    assert abs(float(initial_noise((1, 8, 8), 0, 0, 200).std()) - 1) < 0.03


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.conftest import TINY_OVERRIDES
    run = tmp_path_factory.mktemp("run")
    train(load_config("digits", TINY_OVERRIDES + ["train.steps=2"]), run, progress=False)
    return run


def test_two_processes_write_the_same_npz_as_one(tiny_run, tmp_path, torchrun):
    common = ["sample", tiny_run, "-n", "22", "--batch-size", "4", "--steps", "2", "--sampler", "ddpm", "--seed", "5"]
    assert cli_main([*map(str, common), "--npz", str(tmp_path / "one.npz"), "--png-dir", str(tmp_path / "png")]) == 0
    torchrun([*common, "--npz", tmp_path / "two.npz", "--device", "cpu"])
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (22, 8, 8, 1) and one["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])            # stochastic sampler too
    np.testing.assert_array_equal(one["arr_1"], np.arange(22) % 10)       # balanced classes
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 22 and not (tmp_path / "png" / ".parts").exists()
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[13])), one["arr_0"][13, ..., 0])
    assert not (tmp_path / "one.npz.parts").exists()


def test_a_sample_set_resumes_at_the_missing_chunks(tiny_run, tmp_path):
    parts = tmp_path / "s.npz.parts"
    parts.mkdir()
    np.save(parts / "00000004.npy", np.zeros((4, 8, 8, 1), np.uint8))      # chunk [4, 8) "already done"
    assert cli_main(["sample", str(tiny_run), "--n", "10", "--batch-size", "4", "--steps", "2",
                     "--npz", str(tmp_path / "s.npz")]) == 0
    samples = np.load(tmp_path / "s.npz")["arr_0"]
    assert (samples[4:8] == 0).all() and samples[:4].any() and samples[8:].any()


def test_a_many_class_grid_shows_a_fixed_set_of_classes(tmp_path):
    cfg = load_config("dit-xl2-imagenet256")
    model = torch.nn.Linear(1, 1)
    model.num_classes, model.text_dim = 1000, 0
    labels, classes, nrow = sample_conditions(model, cfg, 16, grid=True)
    assert nrow == 8 and labels[:8].tolist() == labels[8:].tolist() == cfg.sample.grid_classes
    cfg.sample.grid_classes = None
    labels, _, nrow = sample_conditions(model, cfg, 16, grid=True)
    assert nrow == 8 and labels[:8].tolist() == [0, 125, 250, 375, 500, 625, 750, 875]
    assert sample_conditions(model, cfg, 2000)[0].tolist() == (torch.arange(2000) % 1000).tolist()   # FID: all
    grid = save_samples(torch.zeros(16, 3, 32, 32), tmp_path / "g.png", nrow=nrow, scale=1)[0]
    assert Image.open(grid).size == (8 * 34 + 2, 2 * 34 + 2)
    cfg.sample.grid_classes = [3, 1000]
    with pytest.raises(ValueError, match=r"grid_classes \[1000\] lie outside the model's classes 0..999"):
        sample_conditions(model, cfg, 4, grid=True)


class PlacedCodec(LatentCodec):
    """An identity 'autoencoder' that knows the device it was moved to and refuses tensors on
    any other: on a CPU-only machine it fails exactly where a GPU run would mix devices."""

    in_channels, latent_channels, downsample, identity = 1, 1, 1, "placed-identity"

    def __init__(self):
        super().__init__()
        self.placed = None

    def to(self, device, *args, **kwargs):
        self.placed = torch.device(device)
        return self

    def _check(self, x):
        if x.device != self.placed:
            raise RuntimeError(f"device mismatch: a tensor on {x.device}, the autoencoder on {self.placed}")
        return x

    def _moments(self, images):
        return self._check(images), None

    def _decode(self, latents):
        return self._check(latents)


def test_the_autoencoder_follows_the_model_through_training_sampling_and_eval(tmp_path, monkeypatch, tiny_overrides):
    import nrdm.factory
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(nrdm.factory, "_codec", lambda spec: PlacedCodec())    # a fresh, unplaced codec each load
    latent = ["data.vae=placed", "data.latent_channels=1", "data.vae_downsample=1", "train.steps=2",
              "train.eval_every=2", "train.eval_n=10"]
    run = tmp_path / "run"
    train(load_config("digits", tiny_overrides + latent), run, progress=False)   # extraction, grid, eval
    assert cli_main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert cli_main(["sample", str(run), "--n", "4", "--steps", "2", "--npz", str(tmp_path / "s.npz")]) == 0
    assert cli_main(["eval", str(run), "--n", "10", "--steps", "2", "--domain-epochs", "1"]) == 0


def test_the_feature_network_and_text_encoder_follow_the_model(monkeypatch, tiny_config):
    import importlib

    import nrdm.factory
    ev = importlib.import_module("nrdm.metrics.evaluate")      # the package exports a function of that name
    built = {}
    monkeypatch.setattr(ev, "domain_network", lambda data_cfg, epochs=None, progress=True, device=None:
                        built.setdefault("device", device))
    ev.feature_network(tiny_config().data, device=torch.device("cpu"))
    assert built["device"] == torch.device("cpu")

    class Encoder:
        def __init__(self):
            self.encoder = torch.nn.Linear(1, 1)
            self.encoder.to = lambda device: built.setdefault("text", torch.device(device))

        def __call__(self, captions):
            return torch.zeros(len(captions), 3)
    monkeypatch.setattr(nrdm.factory, "_text_encoder", lambda spec, tokens: Encoder())
    cfg = tiny_config("model.text_encoder=stand-in", "data.captions=true")
    model = torch.nn.Linear(1, 1)
    model.text_dim = 3
    sample_conditions(model, cfg, 4)
    assert built["text"] == torch.device("cpu")


@pytest.mark.parametrize("sampler", ["euler-a", "dpm++2m-sde", "dpm++3m-sde", "heun"])
def test_every_sampler_runs_from_the_command_line_with_the_guidance_options(tiny_run, tmp_path, sampler):
    out = tmp_path / "g.png"
    assert cli_main(["sample", str(tiny_run), "-n", "10", "--steps", "3", "--sampler", sampler, "--spacing", "karras",
                     "--cfg", "3", "--guidance-interval", "0.5", "50", "--cfg-rescale", "0.7", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0


def test_sample_settings_are_validated(tiny_config):
    from nrdm.factory import validate
    with pytest.raises(ValueError, match=r"guidance_interval must be \[lo, hi\] with 0 <= lo < hi"):
        validate(tiny_config("sample.guidance_interval=[3, 1]"))
    with pytest.raises(ValueError, match="cfg_rescale must lie in"):
        validate(tiny_config("sample.cfg_rescale=1.5"))
    with pytest.raises(ValueError, match="unknown sample.spacing 'even'"):
        validate(tiny_config("sample.spacing=even"))


def test_bf16_and_compiled_sampling_agree_with_fp32(tiny_run, monkeypatch):
    """Sampling options that change how, not what, is computed: bf16 autocast within bf16's
    precision of the fp32 samples, torch.compile equal to eager. The compiled path is traced by
    dynamo with the "eager" backend: the same wrapping and guards without inductor's minutes of
    code generation (benchmarks/sampler_sweep.py times the real thing)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    from nrdm.factory import load_run
    from nrdm.sampling import generate
    cfg, model, schedule, _ = load_run(tiny_run)
    labels = torch.arange(4) % 10
    run = lambda **options: generate(model, schedule, 4, labels, replace(cfg.sample, sampler="ddim", steps=3,
                                                                         cfg_scale=2.0, **options))
    fp32 = run()
    bf16 = run(precision="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.1
    torch.testing.assert_close(run(compile=True), fp32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(compile=True, cache_interval=2), run(cache_interval=2), rtol=1e-5, atol=1e-5)


def test_ddim_eta_does_not_silence_the_sde_samplers(tiny_config):
    """sample.eta is DDIM's; the ancestral and SDE samplers take sample.sde_eta (runs saved
    before it existed carry eta: 0.0, which would have turned them into their ODE solvers)."""
    from nrdm.sampling import sample_options
    cfg = tiny_config("sample.eta=0.0", "sample.sampler=euler-a")
    assert sample_options(cfg.sample)["eta"] == 1.0
    assert sample_options(replace(cfg.sample, sampler="ddim"))["eta"] == 0.0
    assert sample_options(replace(tiny_config("sample.sde_eta=0.5").sample, sampler="dpm++2m-sde"))["eta"] == 0.5


def test_a_run_copied_without_its_data_samples_and_evaluates(tmp_path, tiny_overrides, capsys):
    """A folder-dataset run learns its class count by scanning data.root. With the folder gone the
    run still rebuilds (model.json in each checkpoint) for sample, info and eval (reference
    statistics and a feature network from files). A checkpoint saved before model.json existed
    says what to do, and `nrdm info` where the data is writes it once."""
    import shutil

    from tests.data.test_datasets import make_folder
    from tests.metrics.test_features import FakeInception

    make_folder(tmp_path / "data")
    run = tmp_path / "run"
    train(load_config("digits", tiny_overrides + ["data.name=folder", f"data.root={tmp_path / 'data'}",
                                                  "data.image_size=8", "train.steps=2"]), run, progress=False)
    torch.jit.script(FakeInception()).save(str(tmp_path / "net.pt"))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(6), sigma=np.eye(6))
    shutil.rmtree(tmp_path / "data")
    grid = ["sample", str(run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "g.png")]
    assert cli_main(grid) == 0
    assert cli_main(["info", str(run)]) == 0 and '"num_classes": 2' in capsys.readouterr().out
    result = tmp_path / "eval.json"
    assert cli_main(["eval", str(run), "--n", "8", "--steps", "2", "--ref-stats", str(tmp_path / "ref.npz"),
                     "--feature-net", str(tmp_path / "net.pt"), "--json", str(result)]) == 0
    assert np.isfinite(json.loads(result.read_text())["metrics"]["fid"])

    ckpt = next((run / "checkpoints").iterdir())
    (ckpt / "model.json").unlink()                                   # as saved before model.json existed
    assert cli_main(grid) == 2
    assert "predates model.json" in capsys.readouterr().err
    make_folder(tmp_path / "data")
    assert cli_main(["info", str(run), "--no-flops"]) == 0 and (ckpt / "model.json").is_file()
    shutil.rmtree(tmp_path / "data")
    assert cli_main(grid) == 0


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    import nrdm.utils.hardware as hardware
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.warns(UserWarning, match="train.precision=bf16 on a CPU without native bf16"):
        hardware.warn_if_slow_bf16("cpu", "bf16", "train.precision")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hardware.warn_if_slow_bf16("cpu", "bf16", "train.precision")            # native: no warning
        hardware.warn_if_slow_bf16("cpu", "fp32", "train.precision")
