"""Parameter and forward-FLOP counts of the size registry, beside the figures DiT / U-ViT / DiMR publish.

    python benchmarks/model_registry.py [--sizes DiT-S/2 DiT-XL/2 ...] [--image-size 32] [--channels 4]
    python benchmarks/model_registry.py --dimr       # the DiMR sizes at their published resolutions

The "native" row of a size is the residual form of its paper: adaLN-Zero for DiT, plain pre-norm
(resnet) for U-ViT, TD-LN (adaln with time-dependent parameters, "td-ln" below) for DiMR.

FLOPs are counted by torch.utils.flop_counter on one sample (explicit attention so attention
matmuls are counted); "GMACs" = FLOPs / 2 is the convention of DiT's tables (fvcore).
"""
import argparse
import time

from nrdm.models import build_model, model_summary

# published: (params in millions, Gflops as reported = GMACs) on a 32x32x4 latent, ImageNet 256
PUBLISHED = {"DiT-S/2": (33.0, 6.06), "DiT-B/2": (130.0, 23.01), "DiT-L/2": (458.0, 80.71),
             "DiT-XL/2": (675.0, 118.64), "U-ViT-H/2": (501.0, 133.0)}
# DiMR (Liu et al. 2024): (size, latent side) -> (params M, GMACs); 256 px = 32x32x4, 512 px = 64x64x4
PUBLISHED_DIMR = {("DiMR-XL/2R", 32): (505.0, 160.0), ("DiMR-G/2R", 32): (1060.0, 331.0),
                  ("DiMR-XL/3R-256", 32): (502.0, 48.0), ("DiMR-XL/3R", 64): (525.0, 206.0),
                  ("DiMR-H/3R", 64): (1030.0, 399.6)}
UNITS = {"td-ln": dict(variant="adaln", gate_source="tdp")}


def row(size, variant, side, channels, num_classes, ref):
    start = time.time()
    unit = UNITS.get(variant, dict(variant=variant, gate_source="cond"))
    model = build_model(size, image_size=side, in_channels=channels, num_classes=num_classes, **unit)
    s = model_summary(model)
    published = ""
    if ref:
        published = f"{ref[0]}, {ref[1]}  (ratio {s['params'] / 1e6 / ref[0]:.3f}, {s['gmacs'] / ref[1]:.3f})"
    print(f"{size:<15} {side:>4} {variant:<11} {s['params'] / 1e6:>11.2f} {s['gmacs']:>9.2f} {s['gflops']:>9.2f}  "
          f"{published}   ({time.time() - start:.0f}s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2", "U-ViT-H/2", "UNet-S"])
    parser.add_argument("--variants", nargs="+", default=["adaln-zero", "nrdm", "resnet"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dimr", action="store_true", help="the DiMR sizes at their published resolutions, "
                        "TD-LN and nrdm units")
    args = parser.parse_args()

    print(f"{'size':<15} {'side':>4} {'variant':<11} {'params (M)':>11} {'GMACs':>9} {'GFLOPs':>9}  "
          f"published (params M, GMACs)  (ratio ours / published)")
    if args.dimr:
        for (size, side), ref in PUBLISHED_DIMR.items():
            for variant in ("td-ln", "nrdm"):
                row(size, variant, side, 4, args.num_classes, ref if variant == "td-ln" else None)
        return
    for size in args.sizes:
        for variant in args.variants:
            # DiT's blocks are adaLN-Zero; U-ViT's are plain pre-norm residual blocks (resnet)
            native = "adaln-zero" if size.startswith("DiT") else "resnet"
            ref = PUBLISHED.get(size) if variant == native else None
            row(size, variant, args.image_size, args.channels, args.num_classes, ref)


if __name__ == "__main__":
    main()
