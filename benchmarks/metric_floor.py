"""The floor of every metric: real held-out images against real training images, with the
built-in domain networks (what a perfect generator would score at these sample counts).

    python benchmarks/metric_floor.py [--datasets digits:16 fashion:28] [--n 2000]
"""
import argparse

from nrdm.config import DataConfig
from nrdm.metrics.evaluate import real_floor
from nrdm.metrics.features import domain_network


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits:16", "fashion:28"])
    parser.add_argument("--n", type=int, default=2000, help="training images standing in for samples")
    args = parser.parse_args()
    for spec in args.datasets:
        name, size = spec.split(":")
        cfg = DataConfig(name=name, image_size=int(size))
        net = domain_network(cfg)
        metrics = real_floor(cfg, args.n, net, progress=True)
        print(f"{name} {size}px: {args.n} train vs held-out test images, {net.name} "
              f"(sha256 {net.content_hash[:12]}, held-out accuracy {net.meta['test_accuracy']:.3f})")
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
