"""The bias statistic, its bootstrap confidence interval and its noise floor.

Bias of an axis with buckets B (the protocol of FASP / Attention Pruning):
``sum over b in B of |mean(axis) - mean(bucket b)|``. The axis mean is the stratified
estimate ``sum_b share_b * mean_b`` with the buckets' population shares, so that a
subset that over-samples small buckets still estimates the population's axis mean.

A sum of absolute deviations is positive even for a perfectly fair model, so every bias
number comes with its noise floor: the statistic's value when bucket labels are permuted.
"""

from __future__ import annotations

import numpy as np


def _groups(buckets: list[str] | np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    labels = np.asarray(buckets)
    names = sorted(set(labels.tolist()))
    return names, [np.nonzero(labels == b)[0] for b in names]


def _weights(names: list[str], sizes: list[int], shares: dict[str, float] | None) -> np.ndarray:
    w = np.array([shares[b] if shares else n for b, n in zip(names, sizes)], dtype=float)
    return w / w.sum()


def bias_from_means(means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bias from bucket means ``[..., buckets]`` and bucket weights ``[buckets]``."""
    axis_mean = (means * weights).sum(-1, keepdims=True)
    return np.abs(axis_mean - means).sum(-1)


def bucket_means(values: np.ndarray, buckets, shares: dict[str, float] | None = None) -> dict[str, float]:
    """Mean value per bucket."""
    names, idx = _groups(buckets)
    return {b: float(np.asarray(values)[i].mean()) for b, i in zip(names, idx)}


def bias_statistic(values, buckets, shares: dict[str, float] | None = None) -> float:
    """``sum_b |mean(axis) - mean(b)|`` with the axis mean weighted by ``shares`` (default: sample sizes)."""
    values = np.asarray(values, dtype=float)
    names, idx = _groups(buckets)
    means = np.array([values[i].mean() for i in idx])
    return float(bias_from_means(means, _weights(names, [len(i) for i in idx], shares)))


def bootstrap_bias(values, buckets, shares=None, reps: int = 1000, seed: int = 0, level: float = 0.95,
                   extra: np.ndarray | None = None) -> dict:
    """Stratified (within-bucket) bootstrap of the bias statistic.

    ``values`` is ``[n]`` or ``[k, n]`` (k score vectors on the same prompts, resampled with the
    same indices: paired). Returns the point estimate(s), the CI, and with ``k == 2`` the CI of
    the difference ``values[0] - values[1]``.
    """
    v = np.atleast_2d(np.asarray(values, dtype=float))
    names, idx = _groups(buckets)
    w = _weights(names, [len(i) for i in idx], shares)
    rng = np.random.default_rng(seed)
    boot_means = np.empty((v.shape[0], reps, len(names)))
    for j, i in enumerate(idx):
        draws = i[rng.integers(0, len(i), size=(reps, len(i)))]  # [reps, n_b]
        boot_means[:, :, j] = v[:, draws].mean(-1)
    boot = bias_from_means(boot_means, w)  # [k, reps]
    point = np.array([bias_statistic(row, buckets, shares) for row in v])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {
        "bias": point.tolist() if len(point) > 1 else float(point[0]),
        "ci": [np.percentile(b, [lo, hi]).tolist() for b in boot] if len(point) > 1 else np.percentile(boot[0], [lo, hi]).tolist(),
        "level": level,
        "reps": reps,
    }
    if len(point) == 2:
        out["diff"] = float(point[0] - point[1])
        out["diff_ci"] = np.percentile(boot[0] - boot[1], [lo, hi]).tolist()
    return out


def noise_floor(values, buckets, shares=None, reps: int = 200, seed: int = 0) -> dict:
    """The bias statistic when bucket labels are shuffled (sizes kept): what noise alone gives."""
    values = np.asarray(values, dtype=float)
    labels = np.asarray(buckets)
    rng = np.random.default_rng(seed)
    sims = np.array([bias_statistic(values, rng.permutation(labels), shares) for _ in range(reps)])
    return {"mean": float(sims.mean()), "p95": float(np.percentile(sims, 95)), "reps": reps}
