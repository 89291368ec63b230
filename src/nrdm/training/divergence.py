"""Divergence guard shared by the trainer and the lab: a run has diverged when its loss is not
finite, or (after a grace period, since early losses fall fast) exceeds `factor` times the lowest
loss seen so far. Non-finite steps are a separate, softer guard in the trainer (skipped, then
stopped after `max_bad_steps`); this one catches a finite blow-up that never comes back.
"""
from __future__ import annotations

import math


class DivergenceMonitor:
    def __init__(self, factor: float = 10.0, grace_steps: int = 100):
        if factor <= 1:
            raise ValueError(f"divergence factor must be > 1 (got {factor}); use 0 in the config to turn it off")
        self.factor, self.grace_steps = factor, grace_steps
        self.running_min = math.inf

    def diverged(self, step: int, loss: float) -> bool:
        """Feed the loss of training step `step` (1-based); True when the run has diverged."""
        if not math.isfinite(loss):
            return True
        if step > self.grace_steps and loss > self.factor * self.running_min:
            return True
        self.running_min = min(self.running_min, loss)
        return False

    def state_dict(self) -> dict:
        return {"running_min": self.running_min}

    def load_state_dict(self, state: dict) -> None:
        self.running_min = float(state["running_min"])
