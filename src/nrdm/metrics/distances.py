"""Sample-quality statistics on feature vectors: Frechet distance (FID / sFID / FVD), KID,
Inception Score, and k-NN precision / recall. All take numpy arrays of features; none knows which
network produced them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set (what FID compares), with the sample count."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need a (N >= 2, D) feature array, got shape {features.shape}")
        return cls(features.mean(0), np.cov(features, rowvar=False), len(features))


class RunningStats:
    """Mean and covariance accumulated over batches of features (sums in float64), so a Frechet
    distance never needs the whole feature set; `merge` adds another accumulator."""

    def __init__(self, dim: int | None = None):
        self.n, self.total, self.outer = 0, None, None

    def update(self, features: np.ndarray) -> "RunningStats":
        x = np.asarray(features, np.float64).reshape(len(features), -1)
        if self.total is None:
            self.total, self.outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        self.n += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        if other.total is not None:
            if self.total is None:
                self.total, self.outer = np.zeros_like(other.total), np.zeros_like(other.outer)
            self.n, self.total, self.outer = self.n + other.n, self.total + other.total, self.outer + other.outer
        return self

    def result(self) -> GaussianStats:
        """sigma = (sum x x^T - n mu mu^T) / (n - 1), the unbiased covariance as np.cov."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}")
        mu = self.total / self.n
        return GaussianStats(mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1), self.n)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the matrix root by scipy.

    A singular product (few samples, rank-deficient covariances) is regularised by adding
    eps I to both covariances, as in the reference FID code; tiny imaginary parts from numerical
    error are dropped, large ones are an error.
    """
    diff = a.mu - b.mu
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(len(a.mu))
        covmean = scipy.linalg.sqrtm((a.sigma + eps) @ (b.sigma + eps))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et
    al. 2018), averaged over random subsets; returns (mean, std over subsets)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kaa = (a @ a.T / d + 1) ** 3
        kbb = (b @ b.T / d + 1) ** 3
        kab = (a @ b.T / d + 1) ** 3
        mmd = ((kaa.sum() - np.trace(kaa)) + (kbb.sum() - np.trace(kbb))) / (m * (m - 1)) - 2 * kab.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` chunks (fewer when there are fewer samples);
    returns (mean, std)."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for part in np.array_split(probs, max(1, min(splits, len(probs)))):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(features: np.ndarray, k: int, batch: int = 2048) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour within the set (itself excluded)."""
    radii = np.empty(len(features))
    for start in range(0, len(features), batch):
        d = _pairwise(features[start:start + batch], features)
        radii[start:start + batch] = np.partition(d, k, axis=1)[:, k]       # index 0 is the point itself
    return radii


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(sq, 0))


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, batch: int = 2048) -> float:
    """Fraction of queries inside at least one support ball (centre support[j], radius radii[j])."""
    inside = 0
    for start in range(0, len(queries), batch):
        d = _pairwise(queries[start:start + batch], support)
        inside += int((d <= radii[None]).any(1).sum())
    return inside / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls reaching every point's k-th nearest neighbour; precision = share of fake samples
    inside the real manifold, recall = share of real samples inside the fake manifold."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall
