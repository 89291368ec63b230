"""Training-step time of each residual variant relative to `resnet` at equal width/depth, plus the
cost of the sensitivity penalty, of shared gate heads (gate_source shared) and of fused ones
(fused_gates), measured round-robin in one run (the machine is noisy: only the ratios mean something).

    python benchmarks/variant_step_time.py [--backbone flow] [--width 128] [--depth 6] [--batch 32]
                                           [--only nrdm "nrdm fused gates"]
"""
import argparse
import statistics
import time

import torch

from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss
from nrdm.models import VARIANTS, Conditioning, build_model, count_parameters, gated_units


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
    parser.add_argument("--only", nargs="+", metavar="NAME", help="time only these configurations (and resnet)")
    args = parser.parse_args()
    torch.manual_seed(0)

    shape = dict(backbone=args.backbone, width=args.width, depth=args.depth, heads=args.heads,
                 image_size=args.image_size, in_channels=args.channels, num_classes=10)
    if args.backbone != "unet":
        shape["patch_size"] = args.patch
    configs = {v: (v, LossConfig(), "cond", False) for v in VARIANTS}
    configs["nrdm gamma>0 (1 unit)"] = ("nrdm", LossConfig(gamma=0.01, penalty_units=1), "cond", False)
    configs["nrdm gamma>0 (4 units)"] = ("nrdm", LossConfig(gamma=0.01, penalty_units=4), "cond", False)
    for variant in ("nrdm", "adaln-zero"):
        configs[f"{variant} shared gates"] = (variant, LossConfig(), "shared", False)     # adaLN-single
        configs[f"{variant} fused gates"] = (variant, LossConfig(), "cond", True)         # one map, same function
    if args.only:
        unknown = set(args.only) - set(configs)
        if unknown:
            parser.error(f"unknown configuration(s) {sorted(unknown)}; known: {', '.join(configs)}")
        configs = {name: c for name, c in configs.items() if name in args.only or name == "resnet"}
    schedule = VPSchedule()
    x0 = torch.randn(args.batch, args.channels, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch,))

    setups = {}
    for name, (variant, loss_cfg, gate_source, fused) in configs.items():
        model = build_model(variant=variant, gate_source=gate_source, fused_gates=fused, **shape)
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
    fused_pairs = [(v, f"{v} fused gates") for v in ("nrdm", "adaln-zero") if {v, f"{v} fused gates"} <= set(setups)]
    for per_unit, fused in fused_pairs:         # the gate heads alone: what fusing can save at most
        ms = {name: gate_milliseconds(setups[name][0], args.batch, args.rounds) for name in (per_unit, fused)}
        print(f"{per_unit}: all units' gates, forward + backward: per-unit heads {ms[per_unit]:.2f} ms, "
              f"fused {ms[fused]:.2f} ms ({ms[fused] / ms[per_unit]:.2f}x)")


def gate_milliseconds(model, batch: int, rounds: int, repeats: int = 20) -> float:
    """Median time of computing every unit's gates from c (forward + backward), in ms."""
    vec = torch.randn(batch, model.embed.time.mlp[-1].out_features, requires_grad=True)
    generators = [u.gates for u in gated_units(model) if u.gates is not None]
    times = []
    for _ in range(rounds + 1):                  # the first round warms up
        start = time.perf_counter()
        for _ in range(repeats):
            fused = model.embed.fused_gates(vec) if model.embed.fused_gates is not None else None
            cond = Conditioning(vec, torch.zeros(batch), None, fused)
            sum(g(cond).sum() for g in generators).backward()
        times.append((time.perf_counter() - start) / repeats * 1e3)
    return statistics.median(times[1:])


if __name__ == "__main__":
    main()
