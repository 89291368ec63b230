"""What the gates of trained runs do: per run, the mean over units of |alpha| (the branch gate),
|beta| (the output shift), the residual stream's RMS and the unit update's RMS, on noised inputs
at random steps and classes. Used to compare seeds of one setting (docs/depth-study.md: do nrdm's
slow seeds differ in their gates?).

    python benchmarks/gate_statistics.py RUN [RUN ...] [--weights ema|model] [--n 256]
"""
import argparse

import torch

from nrdm.factory import load_run
from nrdm.models.gated_unit import gated_units


@torch.no_grad()
def unit_statistics(model, n: int, seed: int = 0) -> dict[str, float]:
    """Means over units (and samples) of |gate|, |out_shift|, RMS of z and RMS of z' - z."""
    rows = []

    def record(unit, inputs, out):
        z, cond = inputs
        g = unit.gate_values(cond, z.ndim)
        rows.append([g["gate"].abs().mean().item() if "gate" in g else 1.0,
                     g["out_shift"].abs().mean().item() if "out_shift" in g else 0.0,
                     z.pow(2).mean().sqrt().item(), (out - z).pow(2).mean().sqrt().item()])

    hooks = [unit.register_forward_hook(record) for unit in gated_units(model)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *model.sample_shape, generator=g)
    t = torch.randint(0, model.num_timesteps, (n,), generator=g)
    labels = torch.randint(0, model.num_classes, (n,), generator=g) if model.num_classes else None
    model(x, t, labels)
    for hook in hooks:
        hook.remove()
    stats = torch.tensor(rows)
    return {"|alpha|": stats[:, 0].mean().item(), "|beta|": stats[:, 1].mean().item(),
            "max unit |beta|": stats[:, 1].max().item(), "rms z": stats[:, 2].mean().item(),
            "rms update": stats[:, 3].mean().item(), "|beta| / rms z": (stats[:, 1] / stats[:, 2]).mean().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema")
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()
    for run in args.runs:
        _, model, _, ckpt = load_run(run, use_ema=args.weights == "ema")
        stats = unit_statistics(model, args.n)
        print(f"{ckpt}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
