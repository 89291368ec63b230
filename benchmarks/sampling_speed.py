"""Sampling speed of one trained run under feature caching, autocast and torch.compile, as images
per second against fp32 eager without cache, timed side by side in interleaved rounds (the
machine is shared and noisy; only the ratios mean something). Quality at each setting comes from
benchmarks/sampler_sweep.py; this script times sampling alone.

    python benchmarks/sampling_speed.py RUN [--n 256] [--rounds 3] [--cache 1 2 3 5]
        [--precisions fp32 bf16] [--compile] [--sampler dpm++2m] [--steps 25]

compile: the first (untimed) pass compiles; the rounds time the compiled network.
"""
import argparse
import dataclasses
import statistics
import time

import torch

from nrdm.factory import load_run, output_kwargs
from nrdm.sampling import generate, sample_conditions


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", nargs="+", type=int, default=[1, 2, 3, 5])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="also time the compiled network (fp32, no cache)")
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    cfg, model, schedule, _ = load_run(args.run)
    base = cfg.sample
    base = dataclasses.replace(base, sampler=args.sampler or base.sampler, steps=args.steps or base.steps)
    settings = {f"cache {c}, {p}": dataclasses.replace(base, cache_interval=c, precision=p)
                for p in args.precisions for c in args.cache}
    if args.compile:
        settings["cache 1, fp32, compiled"] = dataclasses.replace(base, cache_interval=1, compile=True)
    condition, _, _ = sample_conditions(model, cfg, args.n)
    extra = output_kwargs(cfg)

    def draw(setting):
        return generate(model, schedule, args.n, condition, setting, batch_size=args.n, **extra)

    for setting in settings.values():               # warm-up (and compilation)
        draw(setting)
    seconds = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, setting in settings.items():
            start = time.perf_counter()
            draw(setting)
            seconds[name].append(time.perf_counter() - start)
    reference = statistics.median(seconds[next(iter(settings))])
    print(f"{base.sampler}, {base.steps} steps, guidance {base.cfg_scale}, n = {args.n}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'setting':<26} {'s':>8} {'img/s':>8} {'x fp32 eager, no cache':>23}")
    for name, times in seconds.items():
        med = statistics.median(times)
        print(f"{name:<26} {med:>8.2f} {args.n / med:>8.1f} {reference / med:>23.2f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
