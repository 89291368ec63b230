"""Evaluation of a generator against reference statistics, with the protocol recorded beside
every number: dataset and split, sample counts, feature network and its hash, sampler, steps
and NFE, guidance, seed, package version and git commit.

    result = evaluate(model, schedule, cfg, n=1000)        # -> {"metrics": {...}, "protocol": {...}}
"""
from __future__ import annotations

import datetime
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import nrdm
from nrdm.metrics.distances import (GaussianStats, frechet_distance, inception_score, kernel_inception_distance,
                                    precision_recall)
from nrdm.metrics.features import DOMAIN_DATASETS, TorchScriptI3D, TorchScriptInception, domain_network
from nrdm.utils.cache import cache_dir
from nrdm.sampling import generate, sample_conditions


def extract(net, images: torch.Tensor, batch_size: int = 256, progress: bool = False) -> dict[str, np.ndarray]:
    """Features of `images` in batches, concatenated per key."""
    parts: dict[str, list] = {}
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
        for key, value in net(images[start:start + batch_size]).items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def default_split(data_cfg) -> str:
    """Reference split: the held-out one where the dataset has it (digits: its fixed 20% test part)."""
    return "test" if data_cfg.name in ("digits", "mnist", "fashion", "moving-digits") else data_cfg.split


def reference_features(data_cfg, split: str, net, max_n: int = 10_000, progress: bool = True) -> dict:
    """Features of up to max_n real images of (dataset, split), cached on disk under a key made of
    dataset, split, image size, feature-network hash and max_n."""
    from nrdm.data.datasets import build_dataset

    frames = f"-f{data_cfg.frames}s{data_cfg.frame_stride}" if data_cfg.frames else ""
    key = (f"{data_cfg.name}-{split}-{data_cfg.image_size}px{frames}-{net.content_hash[:16]}-n{max_n}"
           .replace("/", "_"))
    path = cache_dir() / "ref-stats" / f"{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return {k: cached[k] for k in cached.files}
    dataset = build_dataset(replace(data_cfg, split=split, hflip=False, vae=None, captions=False))   # pixels
    n = min(max_n, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    if hasattr(dataset, "batch"):
        images, labels = dataset.batch(order)
    else:
        items = [dataset[int(i)] for i in tqdm(order, desc="reference images", disable=not progress)]
        images, labels = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    feats = extract(net, images, progress=progress)
    feats["labels"] = labels.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **feats)
    tmp.replace(path)
    return feats


def compute_metrics(real: dict, fake: dict, fake_labels: np.ndarray | None = None, kind: str = "image",
                    kid_subset: int = 1000, k: int = 3) -> dict:
    """All metrics the features allow. kind="video" names the Frechet distance FVD."""
    out: dict = {}
    fd = frechet_distance(GaussianStats.of(real["pool"]), GaussianStats.of(fake["pool"]))
    out["fvd" if kind == "video" else "fid"] = fd
    if kind == "image":
        kid, kid_std = kernel_inception_distance(real["pool"], fake["pool"], subset_size=kid_subset)
        out.update(kid=kid, kid_std=kid_std)
        out["precision"], out["recall"] = precision_recall(real["pool"], fake["pool"], k=k)
        if "spatial" in real and "spatial" in fake:
            out["sfid"] = frechet_distance(GaussianStats.of(real["spatial"]), GaussianStats.of(fake["spatial"]))
    if "probs" in fake:
        out["is"], out["is_std"] = inception_score(fake["probs"])
        if fake_labels is not None and fake["probs"].shape[1] > int(fake_labels.max()):
            out["class_accuracy"] = float((fake["probs"].argmax(1) == fake_labels).mean())
    return out


def git_commit() -> str | None:
    try:
        root = Path(nrdm.__file__).resolve().parent
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return result.stdout.strip() + ("-dirty" if dirty else "") if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def feature_network(data_cfg, spec: str | None = None, domain_epochs: int | None = None, progress: bool = True):
    """spec: None (the domain network where one exists, else Inception / I3D for video), "domain"
    (built-in network of digits/mnist/fashion/moving-digits), "inception" / "i3d" (TorchScript
    file from $NRDM_INCEPTION / $NRDM_I3D), or a path to such a TorchScript file (I3D for video
    data, Inception for images)."""
    video = data_cfg.frames > 0
    if spec in (None, "domain"):
        if spec is None and data_cfg.name not in DOMAIN_DATASETS:
            return TorchScriptI3D() if video else TorchScriptInception()
        return domain_network(data_cfg, epochs=domain_epochs, progress=progress)
    if spec in ("inception", "i3d"):
        return TorchScriptI3D() if spec == "i3d" else TorchScriptInception()
    return TorchScriptI3D(spec) if video else TorchScriptInception(spec)


@torch.no_grad()
def real_floor(data_cfg, n: int, net=None, seed: int = 1, progress: bool = False) -> dict:
    """The metrics of n real training images against the held-out reference: what a perfect
    generator would score at this n (the floor every generated-sample figure is read against)."""
    from nrdm.data.datasets import build_dataset, load_digits_dataset

    net = net or feature_network(data_cfg, progress=progress)
    split = default_split(data_cfg)
    real = reference_features(data_cfg, split, net, progress=progress)
    train = (load_digits_dataset(data_cfg.image_size, "train-only") if data_cfg.name == "digits"
             else build_dataset(replace(data_cfg, split="train", vae=None, captions=False)))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    images, labels = train.batch(pick)
    return compute_metrics(real, extract(net, images), labels.numpy(), net.kind)


@torch.no_grad()
def evaluate(model, schedule, cfg, n: int = 1000, sampler: str | None = None, steps: int | None = None,
             cfg_scale: float | None = None, seed: int = 0, ref: str | None = None, net=None,
             ref_max_n: int = 10_000, device="cpu", progress: bool = True, extra_protocol: dict | None = None) -> dict:
    """Generate n samples (classes balanced: 0, 1, ..., K-1, 0, ...), extract features, compare with
    the reference. ref: "NAME[:SPLIT]" (default: the run's dataset, held-out split)."""
    s = cfg.sample
    sampler, steps = sampler or s.sampler, steps or s.steps
    cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
    data_cfg = cfg.data
    split = default_split(data_cfg)
    if ref:
        name, _, ref_split = ref.partition(":")
        data_cfg = replace(data_cfg, name=name)
        split = ref_split or default_split(data_cfg)
    net = net or feature_network(data_cfg, progress=progress)
    real = reference_features(data_cfg, split, net, ref_max_n, progress)

    condition, labels, _ = sample_conditions(model, cfg, n)     # text models: prompts naming the classes
    from nrdm.factory import output_kwargs
    images = generate(model, schedule, n, condition, sampler, steps, cfg_scale, s.eta, seed, device=device,
                      progress=progress, **output_kwargs(cfg))
    fake = extract(net, images, progress=progress)
    metrics = compute_metrics(real, fake, labels.numpy() if labels is not None else None, net.kind)
    guided = model.conditional and cfg_scale != 1.0
    protocol = {
        "dataset": data_cfg.name, "split": split, "image_size": data_cfg.image_size,
        "n_real": int(len(real["pool"])), "n_fake": n,
        "feature_network": net.name, "feature_network_sha256": net.content_hash,
        "sampler": sampler, "steps": steps, "nfe": steps * (2 if guided else 1), "cfg_scale": cfg_scale,
        "seed": seed, "class_labels": ("unconditional" if labels is None else "balanced 0..K-1" if not model.text_dim
                                       else "balanced 0..K-1 as prompts naming the class"),
        "kid_subset_size": min(1000, n, int(len(real["pool"]))), "precision_recall_k": 3,
        "nrdm_version": nrdm.__version__, "git_commit": git_commit(), "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    protocol.update(extra_protocol or {})
    return {"metrics": metrics, "protocol": protocol}


def format_table(result: dict) -> str:
    rows = [f"{'metric':<16}{'value':>12}"] + [f"{k:<16}{v:>12.4f}" for k, v in result["metrics"].items()]
    p = result["protocol"]
    rows.append(f"({p['n_fake']} samples vs {p['n_real']} {p['dataset']}:{p['split']} images, {p['feature_network']}, "
                f"{p['sampler']} {p['steps']} steps, cfg {p['cfg_scale']}, seed {p['seed']})")
    return "\n".join(rows)
