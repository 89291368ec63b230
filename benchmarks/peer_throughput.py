"""Training-step time of our flow-shaped model against diffusers' DiTTransformer2DModel at equal shape
(width, depth, patch, heads, classes), fp32 and bf16 autocast, with achieved GFLOP/s against this
machine's GEMM peak, all measured in one run (interleaved rounds, median step; the machine is shared
and noisy, so only the ratios mean something). Needs diffusers (the `[latent]` extra).

    python benchmarks/peer_throughput.py [--rounds 5] [--steps 3] [--shapes small medium dit-s2]

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


def theirs(shape):
    import diffusers
    width, depth, heads, patch, channels, size, _ = shape
    model = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads,
                                            in_channels=channels, out_channels=channels, num_layers=depth,
                                            sample_size=size, patch_size=patch, num_embeds_ada_norm=CLASSES)

    class Wrapped(torch.nn.Module):                      # the same call as ours: (x, t, labels) -> output
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, t, y):
            return self.model(x, timestep=t, class_labels=y).sample

    return Wrapped()


def forward_flops(model, x, t, y) -> int:
    with torch.no_grad(), explicit_attention(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
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
    print(f"{'shape':<8} {'precision':<9} {'model':<20} {'params':>10} {'s/step':>8} {'ratio':>6} {'GFLOP/s':>8} {'% peak':>7}")
    for name in args.shapes:
        shape = SHAPES[name]
        width, depth, heads, patch, channels, size, batch = shape
        x = torch.randn(batch, channels, size, size)
        t = torch.randint(0, 1000, (batch,))
        y = torch.randint(0, CLASSES, (batch,))
        target = torch.randn_like(x)
        models = {"diffusers DiT": theirs(shape), "ours adaln-zero": ours(shape, "adaln-zero"),
                  "ours nrdm": ours(shape, "nrdm"), "ours adaln-zero gelu": ours(shape, "adaln-zero", "gelu"),
                  "ours nrdm gelu": ours(shape, "nrdm", "gelu")}
        flops = {k: 3 * forward_flops(m, x, t, y) for k, m in models.items()}
        for precision in precisions:
            setups = {k: (m, torch.optim.AdamW(m.parameters(), lr=1e-4)) for k, m in models.items()}

            def step(model, opt):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = (model(x, t, y).float() - target).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            times = {k: [] for k in setups}
            for model, opt in setups.values():           # warm-up
                step(model, opt)
            for _ in range(args.rounds):
                for k, (model, opt) in setups.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step(model, opt)
                    times[k].append((time.perf_counter() - start) / args.steps)
            reference = statistics.median(times["diffusers DiT"])
            for k, (model, _) in setups.items():
                med = statistics.median(times[k])
                gflops = flops[k] / med / 1e9
                print(f"{name:<8} {precision:<9} {k:<20} {sum(p.numel() for p in model.parameters()):>10,} "
                      f"{med:>8.4f} {reference / med:>6.2f} {gflops:>8.1f} {100 * gflops / peaks[precision]:>6.1f}%")


if __name__ == "__main__":
    main()
