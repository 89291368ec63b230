"""Feature caching for faster sampling: reuse a backbone's deep features across steps.

Neighbouring sampling steps see nearly the same input, and a network's deep features change
slowly with it (DeepCache, Ma et al. 2024, for U-Nets; block caching as in FORA / Delta-DiT for
transformers). With `interval` = N, every N-th network evaluation is full and stores what each
backbone's deep section did; the N - 1 evaluations between compute only the layers outside it:

- flow-shaped transformer (and the video transformer): the section is blocks 2..depth-1, reused
  as the change it made to its input tokens (the first and last blocks always run);
- U-shaped transformer: everything between the outermost in-block and out-block (inner in-blocks,
  middle, inner out-blocks with their long skips), reused as a change;
- conv U-Net: everything below the first level (down, middle and up), reused as the upsampled
  features it hands to the first level's up path (DeepCache's choice).

    with feature_cache(model, interval=3) as cache:
        for each network evaluation: cache.step(); model(x, t, y)

interval = 1 computes everything (bit-identical to no cache). Samplers never see any of this:
nrdm.sampling steps the cache once per evaluation of eps_fn, whatever the sampler.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class FeatureCache:
    """The stored section outputs and the count of evaluations; `full` says whether the current
    evaluation recomputes everything."""

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError(f"cache interval must be >= 1 (1 = off), got {interval}")
        self.interval, self.calls, self.full = interval, 0, True
        self.store: dict[tuple, torch.Tensor] = {}

    def step(self) -> None:
        """Start a network evaluation: every interval-th one (the first included) is full."""
        self.full = self.calls % self.interval == 0
        self.calls += 1


@contextmanager
def feature_cache(model: nn.Module, interval: int):
    """Attach a FeatureCache to `model` (or nothing for interval 1) for the duration of a block."""
    if interval == 1:
        yield None
        return
    cache = FeatureCache(interval)
    model.feature_cache = cache
    try:
        yield cache
    finally:
        model.feature_cache = None
