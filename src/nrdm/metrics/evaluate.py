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
from nrdm.metrics.distances import (GaussianStats, RunningStats, frechet_distance, inception_score,
                                    kernel_inception_distance, precision_recall)
from nrdm.data.registry import batches, build_dataset, dataset_spec, held_out_split, pixel_config
from nrdm.metrics.features import TorchScriptI3D, TorchScriptInception, domain_network
from nrdm.utils.cache import cache_dir
from nrdm.sampling import sample_conditions


class FeatureSet:
    """Features of a stream of image batches, in order: running statistics (RunningStats) of the
    pool and spatial features for the Frechet distances, and the pool features and class
    probabilities kept for KID, precision/recall, IS and class accuracy. Images never accumulate,
    and the spatial features (2,023-D for Inception) are not kept either."""

    STATS, KEPT = ("pool", "spatial"), ("pool", "probs")

    def __init__(self):
        self.stats: dict[str, RunningStats] = {}
        self.kept: dict[str, list] = {}

    def add(self, features: dict[str, np.ndarray]) -> "FeatureSet":
        for key, value in features.items():
            if key in self.STATS:
                self.stats.setdefault(key, RunningStats()).update(value)
            if key in self.KEPT:
                self.kept.setdefault(key, []).append(np.asarray(value, np.float32))
        return self

    def merge(self, other: "FeatureSet") -> "FeatureSet":
        for key, stats in other.stats.items():
            self.stats.setdefault(key, RunningStats()).merge(stats)
        for key, parts in other.kept.items():
            self.kept.setdefault(key, []).extend(parts)
        return self

    def to_dict(self) -> dict[str, np.ndarray]:
        """Arrays: `pool`, `probs` and, per statistic, `<key>_mu` and `<key>_sigma`."""
        out = {key: np.concatenate(parts) for key, parts in self.kept.items()}
        for key, running in self.stats.items():
            gaussian = running.result()
            out[f"{key}_mu"], out[f"{key}_sigma"] = gaussian.mu, gaussian.sigma
        return out


def stream_features(net, batches, progress: bool = False, total: int | None = None) -> dict[str, np.ndarray]:
    """FeatureSet.to_dict() of the images (B, C, H, W) in [-1, 1] that `batches` yields."""
    features = FeatureSet()
    for images in tqdm(batches, desc="features", disable=not progress, leave=False, total=total):
        features.add(net(images))
    return features.to_dict()


def extract(net, images: torch.Tensor, batch_size: int = 256, progress: bool = False) -> dict[str, np.ndarray]:
    """Features of in-memory `images` (see stream_features)."""
    return stream_features(net, (images[i:i + batch_size] for i in range(0, len(images), batch_size)), progress,
                           total=-(-len(images) // batch_size))


def default_split(data_cfg) -> str:
    """Reference split: the held-out one where the dataset has it (digits: its fixed 20% test part)."""
    return held_out_split(data_cfg) or data_cfg.split


def reference_features(data_cfg, split: str, net, max_n: int = 10_000, progress: bool = True) -> dict:
    """Features of up to max_n real images of (dataset, split), cached on disk under a key made of
    dataset, split, image size, feature-network hash and max_n."""
    frames = f"-f{data_cfg.frames}s{data_cfg.frame_stride}" if data_cfg.frames else ""
    key = (f"{data_cfg.name}-{split}-{data_cfg.image_size}px{frames}-{net.content_hash[:16]}-n{max_n}"
           .replace("/", "_"))
    path = cache_dir() / "ref-stats" / f"{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return {k: cached[k] for k in cached.files}
    dataset = build_dataset(pixel_config(data_cfg, split=split, hflip=False, captions=False))
    n = min(max_n, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    labels = []
    feats = stream_features(net, (labels.append(y) or x for x, y in batches(dataset, order, 256, data_cfg.num_workers)),
                            progress, total=-(-n // 256))
    labels = torch.cat(labels)
    feats["labels"] = labels.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **feats)
    tmp.replace(path)
    return feats


def _gaussian(features: dict, key: str) -> GaussianStats | None:
    if f"{key}_mu" in features:
        return GaussianStats(features[f"{key}_mu"], features[f"{key}_sigma"], 0)
    return GaussianStats.of(features[key]) if key in features else None


def compute_metrics(real: dict, fake: dict, fake_labels: np.ndarray | None = None, kind: str = "image",
                    kid_subset: int = 1000, k: int = 3) -> dict:
    """All metrics the features allow (a reference given only as mean and covariance allows the
    Frechet distances). kind="video" names the Frechet distance FVD."""
    out: dict = {}
    real_pool, fake_pool = _gaussian(real, "pool"), _gaussian(fake, "pool")
    if len(real_pool.mu) != len(fake_pool.mu):
        raise ValueError(f"the reference has {len(real_pool.mu)}-D features but the feature network gives "
                         f"{len(fake_pool.mu)}-D: use the network the reference statistics were made with")
    out["fvd" if kind == "video" else "fid"] = frechet_distance(real_pool, fake_pool)
    if kind == "image":
        if "pool" in real and "pool" in fake:
            kid, kid_std = kernel_inception_distance(real["pool"], fake["pool"], subset_size=kid_subset)
            out.update(kid=kid, kid_std=kid_std)
            out["precision"], out["recall"] = precision_recall(real["pool"], fake["pool"], k=k)
        real_spatial, fake_spatial = _gaussian(real, "spatial"), _gaussian(fake, "spatial")
        if real_spatial is not None and fake_spatial is not None:
            out["sfid"] = frechet_distance(real_spatial, fake_spatial)
    if "probs" in fake:
        out["is"], out["is_std"] = inception_score(fake["probs"])
        if fake_labels is not None and fake["probs"].shape[1] > int(fake_labels.max()):
            out["class_accuracy"] = float((fake["probs"].argmax(1) == fake_labels).mean())
    return out


def reference_from_file(path: str | Path, net, progress: bool = True) -> tuple[dict, str]:
    """(features, sha256 of the file) of a reference .npz, read as ADM's evaluator reads it: stored
    statistics (mu / sigma, and mu_s / sigma_s for sFID; ADM's reference batches hold those of the
    whole training set, clean-fid's files mu / sigma) give the Frechet distances; stored images
    (arr_0, uint8 NHWC: ADM's 10,000-image batches) give the features for precision / recall and
    KID, streamed through `net` and cached by file hash, and the statistics when none are stored."""
    from nrdm.metrics.features import file_hash
    from nrdm.utils.images import from_uint8, image_batches

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file {path} does not exist")
    digest = file_hash(path)
    with np.load(path) as archive:
        names = set(archive.files)
        stored = {}
        if {"mu", "sigma"} <= names:
            stored.update(pool_mu=archive["mu"], pool_sigma=archive["sigma"])
            if {"mu_s", "sigma_s"} <= names:
                stored.update(spatial_mu=archive["mu_s"], spatial_sigma=archive["sigma_s"])
    if "arr_0" not in names:
        if not stored:
            raise ValueError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma): {sorted(names)}")
        return stored, digest
    cached = cache_dir() / "ref-stats" / f"file-{digest[:16]}-{net.content_hash[:16]}.npz"
    if cached.exists():
        with np.load(cached) as f:
            feats = {k: f[k] for k in f.files}
    else:
        feats = stream_features(net, (from_uint8(b) for b in image_batches(path)), progress)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.stem + ".tmp.npz")
        np.savez(tmp, **feats)
        tmp.replace(cached)
    return {**feats, **stored}, digest


def git_commit() -> str | None:
    try:
        root = Path(nrdm.__file__).resolve().parent
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return result.stdout.strip() + ("-dirty" if dirty else "") if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def feature_network(data_cfg, spec: str | None = None, domain_epochs: int | None = None, progress: bool = True,
                    device="cpu"):
    """spec: None (the domain network where one exists, else Inception / I3D for video), "domain"
    (built-in network of digits/mnist/fashion/moving-digits), "inception" / "i3d" (TorchScript
    file from $NRDM_INCEPTION / $NRDM_I3D), or a path to such a TorchScript file (I3D for video
    data, Inception for images)."""
    video = data_cfg.frames > 0
    if spec in (None, "domain"):
        if spec is None and not dataset_spec(data_cfg.name).domain_network:
            return TorchScriptI3D(device=device) if video else TorchScriptInception(device=device)
        return domain_network(data_cfg, epochs=domain_epochs, progress=progress, device=device)
    if spec in ("inception", "i3d"):
        return TorchScriptI3D(device=device) if spec == "i3d" else TorchScriptInception(device=device)
    return TorchScriptI3D(spec, device) if video else TorchScriptInception(spec, device)


@torch.no_grad()
def real_floor(data_cfg, n: int, net=None, seed: int = 1, progress: bool = False) -> dict:
    """The metrics of n real training images against the held-out reference: what a perfect
    generator would score at this n (the floor every generated-sample figure is read against)."""
    net = net or feature_network(data_cfg, progress=progress)
    split = default_split(data_cfg)
    real = reference_features(data_cfg, split, net, progress=progress)
    train = build_dataset(pixel_config(data_cfg, split=dataset_spec(data_cfg.name).disjoint_train_split,
                                       captions=False))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    images, labels = train.batch(pick)
    return compute_metrics(real, extract(net, images), labels.numpy(), net.kind)


@torch.no_grad()
def sample_features(model, schedule, cfg, n: int, net, device="cpu", progress: bool = True, batch_size: int = 256,
                    distributed: bool = False):
    """(features of n generated samples, their class labels or None), drawn as cfg.sample says.
    Samples are generated chunk
    by chunk (nrdm.sampling.generate_chunks) and dropped once their features are taken. With
    distributed=True every process of torch.distributed generates its chunks and all receive the
    features, merged in sample order: the same for any number of processes."""
    import torch.distributed as dist

    from nrdm.factory import output_kwargs
    from nrdm.sampling import chunks, generate_chunks

    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed and dist.is_initialized() else (0, 1)
    condition, labels, _ = sample_conditions(model, cfg, n)     # text models: prompts naming the classes
    mine = generate_chunks(model, schedule, n, condition, cfg.sample, batch_size=batch_size, device=device, rank=rank,
                           world_size=world, **output_kwargs(cfg, device))
    by_chunk = {start: FeatureSet().add(net(images))
                for start, images in tqdm(mine, desc="samples", disable=not progress,
                                          total=len(chunks(n, batch_size, rank, world)))}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, by_chunk)
        by_chunk = {start: part for d in gathered for start, part in d.items()}
    features = FeatureSet()
    for start in sorted(by_chunk):
        features.merge(by_chunk[start])
    return features.to_dict(), labels


def file_features(path: str | Path, net, progress: bool = True) -> tuple[dict, np.ndarray | None]:
    """(features, labels or None) of a sample set on disk: an .npz (arr_0 uint8 NHWC, arr_1
    labels if present: ADM's and `nrdm sample --npz`'s layout) or a folder of image files."""
    from nrdm.utils.images import from_uint8, image_batches, npz_member_batches

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sample set {path} does not exist (an .npz or a folder of images)")
    features = stream_features(net, (from_uint8(b) for b in image_batches(path)), progress)
    labels = None
    if path.suffix == ".npz" and "arr_1" in np.load(path).files:
        labels = np.concatenate(list(npz_member_batches(path, "arr_1", 1 << 20)))
    return features, labels


@torch.no_grad()
def evaluate(model, schedule, cfg, n: int = 1000, ref: str | None = None, net=None,
             ref_max_n: int = 10_000, device="cpu", progress: bool = True, extra_protocol: dict | None = None,
             ref_stats: str | Path | None = None, samples: str | Path | None = None, batch_size: int = 256,
             distributed: bool = False) -> dict:
    """Compare samples with a reference: {"metrics": ..., "protocol": ...}.

    Samples: n generated by `model` as cfg.sample says (sampler, steps, guidance, seed, ...;
    classes balanced 0, 1, ..., K-1, 0, ...; split over the processes with distributed=True), or
    a sample set on disk (`samples`: .npz or folder). The
    reference: a statistics file (`ref_stats`: an ADM reference batch or mu/sigma), else the
    dataset `ref` = "NAME[:SPLIT]" (default: the run's dataset, held-out split)."""
    data_cfg = cfg.data if cfg is not None else None
    protocol: dict = {}
    if ref_stats is not None:
        net = net or (feature_network(data_cfg, progress=progress, device=device) if data_cfg is not None
                      else TorchScriptInception(device=device))
        real, digest = reference_from_file(ref_stats, net, progress)
        protocol.update(reference_file=str(ref_stats), reference_sha256=digest)
    else:
        split = default_split(data_cfg)
        if ref:
            name, _, ref_split = ref.partition(":")
            data_cfg = replace(data_cfg, name=name)
            split = ref_split or default_split(data_cfg)
        net = net or feature_network(data_cfg, progress=progress, device=device)
        real = reference_features(data_cfg, split, net, ref_max_n, progress)
        protocol.update(dataset=data_cfg.name, split=split, image_size=data_cfg.image_size)
    if samples is not None:
        fake, labels = file_features(samples, net, progress)
        n = len(fake["pool"])
        protocol.update(samples=str(samples))
    else:
        s = cfg.sample
        fake, labels = sample_features(model, schedule, cfg, n, net, device, progress, batch_size, distributed)
        labels = labels.numpy() if labels is not None else None
        guided = model.conditional and s.cfg_scale != 1.0
        protocol.update(sampler=s.sampler, steps=s.steps, nfe=s.steps * (2 if guided else 1), cfg_scale=s.cfg_scale,
                        seed=s.seed,
                        class_labels=("unconditional" if labels is None else "balanced 0..K-1" if not model.text_dim
                                      else "balanced 0..K-1 as prompts naming the class"))
    metrics = compute_metrics(real, fake, labels, net.kind)
    n_real = len(real["pool"]) if "pool" in real else None
    protocol.update({
        "n_real": n_real, "n_fake": n, "feature_network": net.name, "feature_network_sha256": net.content_hash,
        "kid_subset_size": min(1000, n, n_real) if n_real else None, "precision_recall_k": 3,
        "nrdm_version": nrdm.__version__, "git_commit": git_commit(), "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    protocol.update(extra_protocol or {})
    return {"metrics": metrics, "protocol": protocol}


def format_table(result: dict) -> str:
    rows = [f"{'metric':<16}{'value':>12}"] + [f"{k:<16}{v:>12.4f}" for k, v in result["metrics"].items()]
    p = result["protocol"]
    reference = p.get("reference_file") or f"{p['n_real']} {p['dataset']}:{p['split']} images"
    source = p.get("samples") or f"{p['sampler']} {p['steps']} steps, cfg {p['cfg_scale']}, seed {p['seed']}"
    rows.append(f"({p['n_fake']} samples vs {reference}, {p['feature_network']}, {source})")
    return "\n".join(rows)
