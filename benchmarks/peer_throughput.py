"""Training-step time of our flow-shaped model against diffusers' DiTTransformer2DModel at equal shape
(width, depth, patch, heads, classes), and of our conv U-Net (the digits preset, also channels-last)
against diffusers' UNet2DModel at equal parameters, fp32 and bf16 autocast, with achieved GFLOP/s against this
machine's GEMM peak, all measured in one run (interleaved rounds, median step; the machine is shared
and noisy, so only the ratios mean something). Needs diffusers (the `[latent]` extra).

    python benchmarks/peer_throughput.py [--rounds 5] [--steps 3] [--shapes small medium dit-s2 unet]

Columns: step time ratio = diffusers' step time / ours (> 1: we are faster); GFLOP/s = 3 x forward
FLOPs (torch.utils.flop_counter) / step time; peak = a 2048^2 matmul in the same precision.
The "gelu" rows use the exact GELU (`model.activation: gelu`) where DiT and the other rows use its tanh
approximation: a different (equally standard) function, timed because ATen's tanh form is the slower
kernel on CPUs.
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from nrdm.models import build_model
from nrdm.models.layers import explicit_attention
from nrdm.utils.hardware import cpu_has_native_bf16

# name: (width, depth, heads, patch, channels, image size, batch)
SHAPES = {"small": (128, 6, 4, 4, 1, 28, 64), "medium": (256, 8, 4, 2, 4, 16, 64), "dit-s2": (384, 12, 6, 2, 4, 32, 16)}
CLASSES = 10


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def ours(shape, variant, activation="gelu-tanh"):
    width, depth, heads, patch, channels, size, _ = shape
    return build_model(backbone="flow", width=width, depth=depth, heads=heads, patch_size=patch, in_channels=channels,
                       image_size=size, num_classes=CLASSES, variant=variant, embeddings="diffusers",
                       activation=activation)


class AsOurs(torch.nn.Module):
    """A diffusers model called as ours is: (x, t, labels) -> output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model(x, timestep=t, class_labels=y).sample


def theirs(shape):
    import diffusers
    width, depth, heads, patch, channels, size, _ = shape
    model = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads,
                                            in_channels=channels, out_channels=channels, num_layers=depth,
                                            sample_size=size, patch_size=patch, num_embeds_ada_norm=CLASSES)
    return AsOurs(model)


def forward_flops(model, x, t, y) -> int:
    with torch.no_grad(), explicit_attention(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def their_unet():
    """diffusers' UNet2DModel at the digits preset's shape and equal parameters (1.371M against our
    1.380M): three levels (32, 48, 64 channels), 2 res blocks each, attention at the lowest level."""
    import diffusers
    model = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 48, 64),
                                  layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                                  num_class_embeds=CLASSES + 1, norm_num_groups=8, attention_head_dim=8)
    return AsOurs(model)


def our_unet(variant, channels_last=False):
    from nrdm.config import load_config
    from nrdm.factory import build_model_from_config
    model = build_model_from_config(load_config("digits", [f"model.variant={variant}"]))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def time_steps(models: dict, x, t, y, precision: str, rounds: int, steps: int) -> dict:
    """Median seconds per AdamW training step of each model, in interleaved rounds."""
    target = torch.randn_like(x)
    setups = {k: (m, torch.optim.AdamW(m.parameters(), lr=1e-4)) for k, m in models.items()}

    def step(model, opt, inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (model(inputs, t, y).float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # a channels-last model gets channels-last input (the layout it would get from its data loader)
    inputs = {k: x.contiguous(memory_format=torch.channels_last) if k.endswith("channels-last") else x for k in models}
    times = {k: [] for k in setups}
    for k, (model, opt) in setups.items():           # warm-up
        step(model, opt, inputs[k])
    for _ in range(rounds):
        for k, (model, opt) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(model, opt, inputs[k])
            times[k].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def report(name, precision, models, seconds, flops, peak, reference):
    for k, model in models.items():
        gflops = flops[k] / seconds[k] / 1e9
        print(f"{name:<8} {precision:<9} {k:<24} {sum(p.numel() for p in model.parameters()):>10,} "
              f"{seconds[k]:>8.4f} {seconds[reference] / seconds[k]:>6.2f} {gflops:>8.1f} {100 * gflops / peak:>6.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=[*SHAPES, "unet"], choices=[*SHAPES, "unet"],
                        help="unet: the digits preset's conv U-Net against diffusers' UNet2DModel")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    precisions = list(args.precisions)
    if "bf16" in precisions and not cpu_has_native_bf16():
        print("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 matmuls are emulated and far slower than "
              "fp32; bf16 rows skipped")
        precisions.remove("bf16")
    peaks = {p: gemm_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    print("GEMM peak (2048^2 matmul): " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in peaks.items())
          + f"; {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'shape':<8} {'precision':<9} {'model':<24} {'params':>10} {'s/step':>8} {'ratio':>6} {'GFLOP/s':>8} {'% peak':>7}")
    for name in args.shapes:
        if name == "unet":
            batch, size, channels = 64, 16, 1
            models = {"diffusers UNet2DModel": their_unet(), "ours adaln-zero": our_unet("adaln-zero"),
                      "ours nrdm": our_unet("nrdm"), "ours nrdm channels-last": our_unet("nrdm", channels_last=True)}
            reference = "diffusers UNet2DModel"
        else:
            width, depth, heads, patch, channels, size, batch = SHAPES[name]
            shape = SHAPES[name]
            models = {"diffusers DiT": theirs(shape), "ours adaln-zero": ours(shape, "adaln-zero"),
                      "ours nrdm": ours(shape, "nrdm"), "ours adaln-zero gelu": ours(shape, "adaln-zero", "gelu"),
                      "ours nrdm gelu": ours(shape, "nrdm", "gelu")}
            reference = "diffusers DiT"
        x = torch.randn(batch, channels, size, size)
        t = torch.randint(0, 1000, (batch,))
        y = torch.randint(0, CLASSES, (batch,))
        flops = {k: 3 * forward_flops(m, x, t, y) for k, m in models.items()}
        for precision in precisions:
            seconds = time_steps(models, x, t, y, precision, args.rounds, args.steps)
            report(name, precision, models, seconds, flops, peaks[precision], reference)


if __name__ == "__main__":
    main()
