"""The floor of every metric: real held-out images (or clips) against real training ones, with the
built-in domain networks (what a perfect generator would score at these sample counts).

    python benchmarks/metric_floor.py [--presets digits fashion moving-digits] [--n 2000] [--set data.image_size=8]
"""
import argparse

from nrdm.config import load_config
from nrdm.metrics.evaluate import real_floor
from nrdm.metrics.features import domain_network


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["digits", "fashion"], help="the data section of each preset")
    parser.add_argument("--n", type=int, default=2000, help="training images standing in for samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every preset")
    args = parser.parse_args()
    for preset in args.presets:
        data = load_config(preset, args.set).data
        net = domain_network(data)
        metrics = real_floor(data, args.n, net, progress=True)
        print(f"{preset} ({data.name}, {data.image_size}px{f', {data.frames} frames' if data.frames else ''}): "
              f"{args.n} train vs held-out test, {net.name} (sha256 {net.content_hash[:12]}, held-out accuracy "
              f"{net.meta['test_accuracy']:.3f})")
        print("  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
