"""Does torch.compile pay for a preset? Trains each preset eagerly and with `train.compile=true`
through the real trainer, side by side in one run, and prints the compile overhead, the steady
step times and the step at which compiling breaks even, against 10% of the preset's run (the
point by which a preset default must have won, issue 18).

    python benchmarks/compile_payoff.py [--presets digits digits-flow digits-uvit] [--steps 40]

overhead = (compiled wall - eager wall) - (steps - 1) x (compiled step - eager step): the time
the first compiled step took beyond a steady one. break-even = overhead / (eager step - compiled
step), or never when compiling does not make a step faster.
"""
import argparse
import tempfile
import time
from pathlib import Path

from _throughput import timing_overrides, trainer_steps_per_s
from nrdm.config import load_config


def timed_run(preset: str, compile_: bool, steps: int, run_dir: Path) -> tuple[float, float]:
    """(wall seconds of the whole run, steady seconds per step from its second log window)."""
    cfg = load_config(preset, [f"train.compile={str(compile_).lower()}", *timing_overrides(steps)])
    start = time.perf_counter()
    steps_per_s = trainer_steps_per_s(cfg, run_dir)
    return time.perf_counter() - start, 1.0 / steps_per_s


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["digits", "digits-flow", "digits-uvit"])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"{'preset':<12} {'eager s/step':>12} {'compiled':>9} {'speed-up':>8} {'overhead s':>10} "
          f"{'break-even':>10} {'10% of run':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            wall_e, step_e = timed_run(preset, False, args.steps, Path(tmp) / f"{preset}-eager")
            wall_c, step_c = timed_run(preset, True, args.steps, Path(tmp) / f"{preset}-compiled")
            overhead = (wall_c - wall_e) - (args.steps - 1) * (step_c - step_e)
            even = f"{overhead / (step_e - step_c):.0f}" if step_c < step_e else "never"
            tenth = load_config(preset).train.steps // 10
            print(f"{preset:<12} {step_e:>12.3f} {step_c:>9.3f} {step_e / step_c:>7.2f}x {overhead:>10.0f} "
                  f"{even:>10} {tenth:>10}")


if __name__ == "__main__":
    main()
