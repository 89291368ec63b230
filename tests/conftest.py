"""Shared fixtures: a tiny training configuration that runs in seconds on a CPU."""
import pytest

from nrdm.config import load_config

TINY_OVERRIDES = [
    "model.size=UNet-T", "model.width=8", "model.channel_mult=[1, 2]", "model.depth=1", "model.heads=1",
    "model.attention_resolution=4", "data.name=digits", "data.image_size=8", "train.steps=6",
    "train.batch_size=16", "train.warmup_steps=2", "train.log_every=2", "train.ckpt_every=3",
    "train.precision=fp32", "sample.n=10", "sample.steps=2", "sample.sampler=ddim",
]


@pytest.fixture
def tiny_config():
    def make(*extra):
        return load_config("digits", TINY_OVERRIDES + list(extra))
    return make


@pytest.fixture
def tiny_overrides():
    return list(TINY_OVERRIDES)


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "handwritten", "seven", "photo", "of", "an", "ankle",
         "boot", "the", "digit"]


def write_tokenizer(path):
    """A WordPiece tokenizer over VOCAB, saved in `path`."""
    transformers = pytest.importorskip("transformers")
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tok.save_pretrained(path)
    return tok


@pytest.fixture
def tiny_bert(tmp_path):
    """A tiny randomly initialised BERT text encoder (hidden size 32) saved in a directory."""
    transformers = pytest.importorskip("transformers")
    import torch
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    path = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(path)
    write_tokenizer(path)
    return path


@pytest.fixture
def torchrun():
    """run(cli_args, nproc=2): `python -m torch.distributed.run ... -m nrdm.cli *cli_args` on CPU
    processes (gloo) on a free port; returns the CompletedProcess after asserting success."""
    import os
    import socket
    import subprocess
    import sys

    def run(cli_args, nproc: int = 2, timeout: int = 300):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
                "-m", "nrdm.cli", *map(str, cli_args)]
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return result
    return run
