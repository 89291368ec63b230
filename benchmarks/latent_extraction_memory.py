"""Peak memory of latent extraction does not grow with the number of images.

For N, 2N and 4N generated JPEGs (an ImageNet-style folder, --size px), a fresh process extracts
their latents with `nrdm.factory.latent_dataset` (a randomly initialised small autoencoder,
shards of --shard-size images, a DataLoader with --workers) and reports its peak resident memory
(ru_maxrss); the script prints each and its ratio to the smallest, side by side in one run.

    python benchmarks/latent_extraction_memory.py [--n 500] [--size 256] [--shard-size 256] [--workers 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys, time
from nrdm.config import DataConfig
from nrdm.data import build_dataset
from nrdm.factory import latent_dataset
root, ae, shard, workers, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
data = DataConfig(name="folder", root=root, image_size=size, vae=ae, latent_channels=4, vae_downsample=4,
                  num_workers=workers)
start = time.perf_counter()
latents = latent_dataset(data, build_dataset(DataConfig(name="folder", root=root, image_size=size)),
                         shard_size=shard, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"count": len(latents), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": seconds}))
"""


def make_folder(root: Path, n: int, size: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((size * 3 // 2, size * 3 // 2, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="smallest image count (then 2x and 4x)")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image size after the crop and resize")
    args = parser.parse_args()
    from nrdm.models.autoencoder import SmallAutoencoder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        SmallAutoencoder(3, 4, 32, 2).save(tmp / "ae")
        rows = []
        for factor in (1, 2, 4):
            n = args.n * factor
            make_folder(tmp / f"images-{n}", n, args.size)
            env = {**os.environ, "NRDM_CACHE": str(tmp / f"cache-{n}")}
            out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / f"images-{n}"), str(tmp / "ae"),
                                  str(args.shard_size), str(args.workers), str(args.size)], capture_output=True,
                                 text=True, env=env)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        base = rows[0]["peak_mib"]
        print(f"{'images':>8} {'peak RSS MiB':>13} {'vs smallest':>12} {'seconds':>8}")
        for row in rows:
            print(f"{row['count']:>8} {row['peak_mib']:>13.0f} {row['peak_mib'] / base:>11.2f}x {row['seconds']:>8.1f}")
        print(f"({args.size} px RGB, shards of {args.shard_size}, {args.workers} loader workers; the images alone "
              f"would take {rows[-1]['count'] * 3 * args.size ** 2 * 4 / 2**20:.0f} MiB as float32 at the largest count)")


if __name__ == "__main__":
    main()
