"""Class-conditional accuracy of a trained run: a small CNN trained on the run's dataset (train
split minus a held-out part) classifies `--n` samples generated for known labels.

    python benchmarks/class_accuracy.py runs/digits [--n 100] [--steps 25] [--cfg 2.0] [--json out.json]

Prints the classifier's accuracy on held-out real images (its ceiling) and on the samples.
"""
import argparse
from dataclasses import replace
import json
import time
from pathlib import Path

from nrdm.data import build_dataset, dataset_spec, pixel_config
from nrdm.factory import load_run
from nrdm.metrics.classifier import accuracy, predict, train_classifier
from nrdm.sampling import generate, grid_labels


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    cfg, model, schedule, ckpt = load_run(Path(args.run))
    spec = dataset_spec(cfg.data.name)
    train_set = build_dataset(pixel_config(cfg.data, captions=False, split=spec.disjoint_train_split))
    test_set = build_dataset(pixel_config(cfg.data, captions=False, split=spec.held_out_split))
    start = time.time()
    clf = train_classifier(train_set.images, train_set.labels, train_set.num_classes, epochs=args.epochs,
                           progress=True)
    real_acc = accuracy(clf, test_set.images, test_set.labels)
    print(f"classifier: {time.time() - start:.0f}s, held-out real accuracy {real_acc:.3f} (n={len(test_set)})")

    s = cfg.sample = replace(cfg.sample, sampler=args.sampler or cfg.sample.sampler, steps=args.steps or cfg.sample.steps,
                             cfg_scale=cfg.sample.cfg_scale if args.cfg is None else args.cfg, seed=args.seed)
    sampler, steps, cfg_scale = s.sampler, s.steps, s.cfg_scale
    labels = grid_labels(args.n, model.num_classes)
    start = time.time()
    images = generate(model, schedule, args.n, labels, s, progress=True)
    pred = predict(clf, images)
    acc = float((pred == labels).float().mean())
    per_class = [float((pred[labels == k] == k).float().mean()) for k in range(model.num_classes)]
    print(f"samples: {args.n} from {ckpt} ({sampler}, {steps} steps, cfg {cfg_scale}, seed {args.seed}, "
          f"{time.time() - start:.0f}s)")
    print(f"class-conditional accuracy: {acc:.3f}   per class: " + " ".join(f"{a:.1f}" for a in per_class))
    if args.json:
        figures = {"class_accuracy": acc, "per_class": per_class, "real_accuracy": real_acc, "n": args.n,
                   "sampler": sampler, "steps": steps, "cfg": cfg_scale, "seed": args.seed, "checkpoint": str(ckpt)}
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
