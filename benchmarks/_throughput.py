"""Shared by the benchmarks: training throughput of a config through the real trainer."""
import json
from pathlib import Path

from nrdm.training import train


def trainer_steps_per_s(cfg, run_dir: Path) -> float:
    """Steps/s of cfg.train.steps steps of the real trainer (data loading, EMA and logging
    included), read from the second half of the run's log (after warm-up). The config should set
    log_every = steps // 2 and ckpt_every > steps so no checkpoint falls inside the timed window."""
    train(cfg, run_dir, progress=False)
    records = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "steps_per_s" in r][-1]["steps_per_s"]


def timing_overrides(steps: int) -> list[str]:
    """--set overrides for a short timed run of `steps` steps: two log windows, no checkpoint or
    sample grid inside them, minimal warm-up."""
    return [f"train.steps={steps}", f"train.log_every={steps // 2}", f"train.ckpt_every={10 * steps}",
            "train.sample_every=0", "sample.n=1", "sample.steps=1", "train.warmup_steps=1"]
