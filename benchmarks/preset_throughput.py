"""Training throughput (steps/s, images/s) of presets in fp32 and bf16, measured side by side in
one run through the real trainer (data loading, EMA and logging included; no checkpoints or
samples inside the timed window).

    python benchmarks/preset_throughput.py [--presets digits fashion] [--steps 60] [--rounds 2]
        [--precisions fp32 bf16]

"vs fp32" is each precision against the same preset's fp32; "vs first" each preset's fp32 steps/s
against the first preset's (the step-time ratio that sets equal wall-clock budgets).
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from _throughput import timing_overrides, trainer_steps_per_s
from nrdm.config import load_config


def measure(preset: str, precision: str, steps: int, workdir: Path) -> tuple[float, int]:
    cfg = load_config(preset, [f"train.precision={precision}", *timing_overrides(steps)])
    run = workdir / f"{preset}-{precision}-{len(list(workdir.iterdir()))}"
    return trainer_steps_per_s(cfg, run), cfg.train.batch_size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["digits", "fashion"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):                                 # interleaved rounds
            for preset in args.presets:
                for precision in dict.fromkeys(["fp32", *args.precisions]):
                    sps, batch = measure(preset, precision, args.steps, Path(tmp))
                    results.setdefault((preset, precision), []).append(sps)
                    results[(preset, "batch")] = batch
    first = statistics.median(results[(args.presets[0], "fp32")])
    print(f"{'preset':<12} {'precision':<9} {'steps/s':>8} {'images/s':>9} {'vs fp32':>8} {'vs first':>8}")
    for preset in args.presets:
        base = statistics.median(results[(preset, "fp32")])
        for precision in dict.fromkeys(["fp32", *args.precisions]):
            sps = statistics.median(results[(preset, precision)])
            versus_first = f"{sps / first:>8.2f}" if precision == "fp32" else ""
            print(f"{preset:<12} {precision:<9} {sps:>8.2f} {sps * results[(preset, 'batch')]:>9.0f} {sps / base:>8.2f} "
                  f"{versus_first}")


if __name__ == "__main__":
    main()
