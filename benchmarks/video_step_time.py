"""Training-step time of the video backbones on the moving-digits clips (16x16, 8 frames), measured
side by side in one run (forward + backward + AdamW, fp32, interleaved rounds, median):

- the preset's space-time U-Net, with temporal attention at 8x8 and below (the preset), and at
  every level including full resolution;
- the Latte-like transformer at patch 4 (width 96, depth 6) and patch 2 (width 64, depth 6).

    python benchmarks/video_step_time.py [--batch 16] [--steps 5] [--rounds 2]
"""
import argparse
import statistics
import time

import torch

from nrdm.config import load_config
from nrdm.factory import build_model_from_config

MODELS = {
    "space-time U-Net (preset)": [],
    "space-time U-Net, temporal at 16x16 too": ["model.temporal_resolution=null"],
    "Latte-like, patch 4, width 96": ["model.backbone=video", "model.width=96", "model.depth=6", "model.patch_size=4",
                                      "model.mlp_ratio=4", "model.channel_mult=null",
                                      "model.attention_resolution=null", "model.temporal_resolution=null"],
    "Latte-like, patch 2, width 64": ["model.backbone=video", "model.width=64", "model.depth=6", "model.patch_size=2",
                                      "model.mlp_ratio=4", "model.channel_mult=null",
                                      "model.attention_resolution=null", "model.temporal_resolution=null"],
}


def step_seconds(overrides: list[str], batch: int, steps: int) -> tuple[float, int]:
    cfg = load_config("moving-digits", overrides)
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, *model.sample_shape)
    t = torch.randint(0, model.num_timesteps, (batch,))
    labels = torch.randint(0, model.num_classes, (batch,))

    def step():
        loss = (model(x, t, labels) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()                                                      # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps, sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="clips per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, overrides in MODELS.items():
            seconds, params[name] = step_seconds(overrides, args.batch, args.steps)
            times.setdefault(name, []).append(seconds)
    base = statistics.median(times[next(iter(MODELS))])
    print(f"batch {args.batch} clips of 8x16x16, median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'model':<42} {'params':>9} {'s/step':>7} {'vs preset':>9}")
    for name in MODELS:
        seconds = statistics.median(times[name])
        print(f"{name:<42} {params[name]:>9,} {seconds:>7.3f} {seconds / base:>8.2f}x")


if __name__ == "__main__":
    main()
