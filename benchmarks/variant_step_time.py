"""Training-step time of each residual variant relative to `resnet` at equal width/depth, plus the
cost of the sensitivity penalty and of shared gate heads (gate_source shared), measured round-robin in one run (the machine is noisy: only the
ratios mean something).

    python benchmarks/variant_step_time.py [--backbone flow] [--width 128] [--depth 6] [--batch 32]
"""
import argparse
import statistics
import time

import torch

from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss
from nrdm.models import VARIANTS, build_model, count_parameters


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="flow", choices=["flow", "u-transformer", "unet"])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    shape = dict(backbone=args.backbone, width=args.width, depth=args.depth, heads=args.heads,
                 image_size=args.image_size, in_channels=args.channels, num_classes=10)
    if args.backbone != "unet":
        shape["patch_size"] = args.patch
    configs = {v: (v, LossConfig(), "cond") for v in VARIANTS}
    configs["nrdm gamma>0 (1 unit)"] = ("nrdm", LossConfig(gamma=0.01, penalty_units=1), "cond")
    configs["nrdm gamma>0 (4 units)"] = ("nrdm", LossConfig(gamma=0.01, penalty_units=4), "cond")
    configs["nrdm shared gates"] = ("nrdm", LossConfig(), "shared")            # adaLN-single
    configs["adaln-zero shared gates"] = ("adaln-zero", LossConfig(), "shared")
    schedule = VPSchedule()
    x0 = torch.randn(args.batch, args.channels, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch,))

    setups = {}
    for name, (variant, loss_cfg, gate_source) in configs.items():
        model = build_model(variant=variant, gate_source=gate_source, **shape)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[name] = (model, opt, loss_cfg)

    def step(model, opt, loss_cfg, gen):
        out = diffusion_loss(model, x0, labels, schedule, loss_cfg, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    times = {name: [] for name in setups}
    gen = torch.Generator().manual_seed(0)
    for name, (model, opt, cfg) in setups.items():   # warm-up
        step(model, opt, cfg, gen)
    for _ in range(args.rounds):
        for name, (model, opt, cfg) in setups.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt, cfg, gen)
            times[name].append((time.perf_counter() - start) / args.steps)

    base = statistics.median(times["resnet"])
    print(f"{args.backbone} width={args.width} depth={args.depth} batch={args.batch} "
          f"image={args.channels}x{args.image_size}x{args.image_size}, {torch.get_num_threads()} threads")
    print(f"{'configuration':<24} {'params':>9} {'s/step':>8} {'x resnet':>9}")
    for name, (model, _, _) in setups.items():
        med = statistics.median(times[name])
        print(f"{name:<24} {count_parameters(model):>9,} {med:>8.4f} {med / base:>9.2f}")


if __name__ == "__main__":
    main()
