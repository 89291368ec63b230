"""Parameter and forward-FLOP counts of the size registry, beside the figures DiT / U-ViT publish.

    python benchmarks/model_registry.py [--sizes DiT-S/2 DiT-XL/2 ...] [--image-size 32] [--channels 4]

FLOPs are counted by torch.utils.flop_counter on one sample (explicit attention so attention
matmuls are counted); "GMACs" = FLOPs / 2 is the convention of DiT's tables (fvcore).
"""
import argparse
import time

from nrdm.models import build_model, model_summary

# published: (params in millions, Gflops as reported = GMACs) on a 32x32x4 latent, ImageNet 256
PUBLISHED = {"DiT-S/2": (33.0, 6.06), "DiT-B/2": (130.0, 23.01), "DiT-L/2": (458.0, 80.71),
             "DiT-XL/2": (675.0, 118.64), "U-ViT-H/2": (501.0, 133.0)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2", "U-ViT-H/2", "UNet-S"])
    parser.add_argument("--variants", nargs="+", default=["adaln-zero", "nrdm", "resnet"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args()

    print(f"{'size':<11} {'variant':<11} {'params (M)':>11} {'GMACs':>9} {'GFLOPs':>9}  published (params M, GMACs)")
    for size in args.sizes:
        for variant in args.variants:
            start = time.time()
            model = build_model(size, image_size=args.image_size, in_channels=args.channels,
                                num_classes=args.num_classes, variant=variant)
            s = model_summary(model)
            # DiT's blocks are adaLN-Zero; U-ViT's are plain pre-norm residual blocks (resnet)
            native = "adaln-zero" if size.startswith("DiT") else "resnet"
            ref = PUBLISHED.get(size, ("", "")) if variant == native else ("", "")
            print(f"{size:<11} {variant:<11} {s['params'] / 1e6:>11.2f} {s['gmacs']:>9.2f} {s['gflops']:>9.2f}  "
                  f"{ref[0]}, {ref[1]}   ({time.time() - start:.0f}s)")
            del model


if __name__ == "__main__":
    main()
