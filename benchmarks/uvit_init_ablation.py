"""Why the U-shaped transformer learned slowly: its initialisations, side by side (docs/design.md).

    python benchmarks/uvit_init_ablation.py [--steps 300] [--seed 0]

Trains the U-shaped transformer (width 128, depth 7, patch 2, nrdm units) on digits 16x16 from
each initialisation below, and the flow-shaped transformer (width 128, depth 6) for reference,
with the same batches and noise (batch 64, AdamW 1e-3, 100 warm-up steps, grad clip 1), and
prints the mean training loss around step 100 and over the last 50 steps. One process, one
thread per run; about 4 minutes per row on a 2-core CPU.
"""
import argparse
import time

import torch
from torch import nn

from nrdm.data.datasets import load_digits_dataset
from nrdm.diffusion import LossConfig, VPSchedule, diffusion_loss
from nrdm.models import build_model


def before(model):
    """The previous initialisation: PyTorch's default for the 3x3 output conv (a random blur),
    learned positions from N(0, 0.02)."""
    model.out_conv.reset_parameters()
    nn.init.trunc_normal_(model.pos_embed, std=0.02)


def sincos_positions_only(model):
    model.out_conv.reset_parameters()


def identity_conv_only(model):
    nn.init.trunc_normal_(model.pos_embed, std=0.02)


def averaging_skip_fusion(model):
    """On top of the defaults: each long-skip fusion Linear(concat(z, skip)) starts at (z + skip)/2."""
    width = model.pos_embed.shape[-1]
    with torch.no_grad():
        for fuse in model.skip_fuse:
            fuse.weight.zero_()
            fuse.weight[:, :width] = torch.eye(width) / 2
            fuse.weight[:, width:] = torch.eye(width) / 2
            fuse.bias.zero_()


ROWS = {
    "before: random output conv, N(0, 0.02) positions": ("u-transformer", before),
    "sin-cos positions only": ("u-transformer", sincos_positions_only),
    "identity output conv only": ("u-transformer", identity_conv_only),
    "both (the default)": ("u-transformer", lambda model: None),
    "both, skip fusion starts at (z + skip) / 2": ("u-transformer", averaging_skip_fusion),
    "flow-shaped reference (depth 6)": ("flow", lambda model: None),
}


def train_losses(backbone: str, tweak, steps: int, seed: int) -> list[float]:
    data = load_digits_dataset(16, "train")
    torch.manual_seed(seed)
    model = build_model(None, backbone=backbone, image_size=16, in_channels=1, num_classes=10, width=128,
                        depth=7 if backbone == "u-transformer" else 6, heads=4, patch_size=2, variant="nrdm")
    tweak(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule, generator = VPSchedule(), torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100)
        index = torch.randint(0, len(data), (64,), generator=generator)
        out = diffusion_loss(model, data.images[index], data.labels[index], schedule, LossConfig(), generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(out.loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"| initialisation | loss @100 | loss @{args.steps} | seconds |\n|---|---|---|---|")
    for name, (backbone, tweak) in ROWS.items():
        start = time.time()
        losses = train_losses(backbone, tweak, args.steps, args.seed)
        print(f"| {name} | {sum(losses[80:100]) / 20:.3f} | {sum(losses[-50:]) / 50:.3f} | {time.time() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
