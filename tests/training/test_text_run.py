"""Text-to-image through the same trainer, samplers and CLI: embedded digit captions and a caption
file, with a tiny random text encoder the test builds; prompts at sampling time; config errors."""
import json

import numpy as np
import pytest
from PIL import Image

from nrdm.cli import main as cli_main
from nrdm.config import load_config
from nrdm.factory import validate

TINY_TEXT = ["model.size=DiT-T/4", "model.width=32", "model.depth=2", "model.heads=2", "model.text_tokens=4", "data.image_size=8", "train.steps=2",
             "train.batch_size=8", "train.log_every=1", "train.ckpt_every=2", "train.warmup_steps=1",
             "sample.n=4", "sample.steps=2"]


def _sets(*overrides):
    return [a for o in TINY_TEXT + list(overrides) for a in ("--set", o)]


def test_embedded_captions_train_sample_eval(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NRDM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["train", "digits", "--out", str(run), "--no-progress",
            *_sets(f"model.text_encoder={tiny_bert}", "data.captions=true")]
    assert cli_main(args) == 0
    assert (run / "samples" / "step-00000002.png").exists()
    out = tmp_path / "p.png"
    assert cli_main(["sample", str(run), "--n", "6", "--steps", "2", "--prompt", "a handwritten seven",
                     "--prompt", "the digit", "--out", str(out)]) == 0
    assert Image.open(out).size == (8 * (2 * 10 + 2), 8 * (3 * 10 + 2))   # one column per prompt, 3 rows
    capsys.readouterr()
    assert cli_main(["sample", str(run), "--n", "2", "--steps", "2", "--class", "3", "--out", str(out)]) == 2
    assert "not class-conditional (it takes text: use --prompt)" in capsys.readouterr().err
    result = tmp_path / "eval.json"
    assert cli_main(["eval", str(run), "--n", "20", "--steps", "2", "--json", str(result), "--domain-epochs", "1"]) == 0
    protocol = json.loads(result.read_text())["protocol"]
    assert protocol["class_labels"] == "balanced 0..K-1 as prompts naming the class"
    assert "class_accuracy" in json.loads(result.read_text())["metrics"]


def test_caption_file_run_needs_prompts(tiny_bert, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": "a photo of the digit" if i % 2 else "a boot"}))
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    run = tmp_path / "run"
    assert cli_main(["train", "digits", "--out", str(run), "--no-progress",
                     *_sets(f"model.text_encoder={tiny_bert}", "data.name=captions",
                            f"data.root={tmp_path / 'c.jsonl'}", "sample.n=2")]) == 0
    capsys.readouterr()
    assert cli_main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "trained on a caption file: pass prompts" in capsys.readouterr().err
    assert cli_main(["sample", str(run), "--n", "2", "--steps", "2", "--prompt", "a boot",
                     "--out", str(tmp_path / "x.png")]) == 0


def test_text_config_errors():
    with pytest.raises(ValueError, match="caption data .* and model.text_encoder go together"):
        validate(load_config("digits", ["model.text_encoder=minilm"]))


def test_default_prompts_put_one_class_per_grid_column(tiny_bert):
    """Without prompts, a model trained on embedded captions samples class-naming prompts in the
    order of the class labels, one class per column of the grid."""
    from types import SimpleNamespace

    import torch

    from nrdm.data.captions import class_caption
    from nrdm.factory import text_encoder
    from nrdm.sampling import sample_conditions

    cfg = load_config("digits", [f"model.text_encoder={tiny_bert}", "data.captions=true"])
    cond, classes, nrow = sample_conditions(SimpleNamespace(text_dim=1), cfg, 25)
    assert nrow == 10 and classes.tolist() == [i % 10 for i in range(25)]
    expected = text_encoder(cfg)([class_caption("digits", i % 10) for i in range(25)])
    torch.testing.assert_close(cond.pooled, expected.pooled)
