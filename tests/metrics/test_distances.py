"""Metric math against closed forms and constructed cases."""
import numpy as np
import pytest

from nrdm.metrics.distances import (GaussianStats, frechet_distance, inception_score, kernel_inception_distance,
                                    precision_recall)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # commuting (diagonal) covariances: ||dmu||^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = rng.uniform(0.2, 2.0, 5), rng.uniform(0.2, 2.0, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    got = frechet_distance(GaussianStats(mu1, np.diag(s1), 10), GaussianStats(mu2, np.diag(s2), 10))
    assert got == pytest.approx(expected, rel=1e-9)
    # full covariance and its scaled copy: tr(S + c^2 S - 2 c S) = (1 - c)^2 tr(S)
    A = rng.normal(size=(6, 6))
    S = A @ A.T + 0.1 * np.eye(6)
    got = frechet_distance(GaussianStats(np.zeros(6), S, 10), GaussianStats(np.zeros(6), 9 * S, 10))
    assert got == pytest.approx(4 * np.trace(S), rel=1e-7)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    base = GaussianStats.of(x)
    assert abs(frechet_distance(base, base)) < 1e-6
    fids = [frechet_distance(base, GaussianStats.of(x + sigma * rng.normal(size=x.shape)))
            for sigma in (0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_kid_is_zero_in_expectation_for_identical_distributions():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(1500, 8)), rng.normal(size=(1500, 8))
    kid, std = kernel_inception_distance(x, y, subsets=50, subset_size=500)
    assert abs(kid) < 3 * std / np.sqrt(50) + 1e-3          # unbiased: no positive offset
    shifted, _ = kernel_inception_distance(x, y + 0.5, subsets=50, subset_size=500)
    assert shifted > 10 * max(abs(kid), std)


def test_inception_score_extremes():
    K = 7
    confident_uniform = np.eye(K)[np.arange(700) % K]        # one-hot, every class equally often
    mean, _ = inception_score(confident_uniform, splits=10)
    assert mean == pytest.approx(K, rel=1e-6)
    constant = np.tile(np.eye(K)[2], (700, 1))
    assert inception_score(constant, splits=10)[0] == pytest.approx(1.0, abs=1e-6)
    uncertain = np.full((700, K), 1.0 / K)
    assert inception_score(uncertain, splits=10)[0] == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_on_constructed_sets():
    """Real: a 10x10 grid of unit spacing. Fake: copies of its left half (50 points) plus 50
    points far away. Precision = 50/100. The fake manifold (k = 3 balls of radius 1 around the
    left-half copies) covers the left half and the adjacent column: recall = 60/100."""
    grid = np.array([(i, j) for i in range(10) for j in range(10)], dtype=float)
    left = grid[grid[:, 0] < 5]
    fake = np.concatenate([left, left + 100.0])
    precision, recall = precision_recall(grid, fake, k=3)
    assert precision == pytest.approx(0.5) and recall == pytest.approx(0.6)
    assert precision_recall(grid, grid, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(grid[:3], grid, k=3)


def test_running_statistics_equal_the_one_shot_computation():
    from nrdm.metrics.distances import RunningStats
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3.0
    one = GaussianStats.of(x)
    parts = [RunningStats().update(x[:123]), RunningStats().update(x[123:400]), RunningStats().update(x[400:])]
    streamed = parts[0].merge(parts[1]).merge(parts[2]).result()
    np.testing.assert_allclose(streamed.mu, one.mu, rtol=1e-12)
    np.testing.assert_allclose(streamed.sigma, one.sigma, rtol=1e-9, atol=1e-12)
    assert streamed.n == 500
    y = rng.normal(size=(300, 6))
    assert frechet_distance(streamed, GaussianStats.of(y)) == pytest.approx(frechet_distance(one, GaussianStats.of(y)))
