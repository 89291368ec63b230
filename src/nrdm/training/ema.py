"""Exponential moving average of the weights, used for sampling."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- d * ema + (1 - d) * theta after every optimizer step, with the usual warm-up
    d_step = min(decay, (1 + step) / (10 + step)) so early averages are not dominated by the
    random initialisation. Buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.model.parameters())
        # under FSDP the live parameters are shards (DTensor): gather them for the full EMA copy
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b.full_tensor() if hasattr(b, "full_tensor") else b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
