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
