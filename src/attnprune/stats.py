"""The bias statistic, its bootstrap confidence interval and its noise floor.

Bias of an axis with buckets B (the protocol of FASP / Attention Pruning):
``sum over b in B of |mean(axis) - mean(bucket b)|``. The axis mean is the weighted mean
``sum_b share_b * mean_b`` with the buckets' population shares, so that a subset that
over-samples small buckets still estimates the population's axis mean.

Template adjustment (``strata``): HolisticBias sentences come from ~26 templates, and on
SmolLM2 the template explains ~77% of the per-prompt variance of the likelihood score. Raw
bucket means inherit the random template mix of each bucket's sample. With ``strata``
(one template label per prompt) the bucket means are the bucket coefficients of the
fixed-effects regression ``score ~ bucket + template``: bucket effects compared at the
same template mix. This removes template composition noise without discarding prompts.

A sum of absolute deviations is positive even for a perfectly fair model, so every bias
number comes with its noise floor: the statistic's value when bucket labels are permuted
(within templates when adjusted).
"""

from __future__ import annotations

import numpy as np


class BucketDesign:
    """The prompts' bucket (and optional template) labels and the bucket weights.

    ``means(values)`` maps per-prompt values ``[..., n]`` to bucket means ``[..., B]``
    (template-adjusted when ``strata`` is given) as one linear projection.
    """

    def __init__(self, buckets, shares: dict[str, float] | None = None, strata=None):
        self.buckets = np.asarray(buckets)
        self.strata = None if strata is None else np.asarray(strata)
        self.names = sorted(set(self.buckets.tolist()))
        sizes = [int((self.buckets == b).sum()) for b in self.names]
        w = np.array([shares[b] if shares else n for b, n in zip(self.names, sizes)], dtype=float)
        self.weights = w / w.sum()
        self.projection = self._projection(np.arange(len(self.buckets)), self.buckets)

    def _projection(self, idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``[B, n]`` matrix giving bucket means of ``values[idx]`` under bucket ``labels``."""
        return np.asarray(self._projections(idx[None, :], labels)[0])

    def _projections(self, resamples: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Stacked projections ``[r, B, n]`` for resampled index rows that share bucket ``labels``."""
        onehot = (labels[:, None] == np.array(self.names)[None, :]).astype(float)
        if self.strata is None:
            return np.broadcast_to((onehot / np.maximum(onehot.sum(0), 1)).T, (len(resamples), *onehot.T.shape))
        levels = np.array(sorted(set(self.strata.tolist()))[1:])
        strata = (self.strata[resamples][:, :, None] == levels[None, None, :]).astype(float)  # [r, n, T-1]
        design = np.concatenate([np.broadcast_to(onehot, (len(resamples), *onehot.shape)), strata], axis=2)
        return np.linalg.pinv(design)[:, : len(self.names)]

    def means(self, values) -> np.ndarray:
        """Bucket means ``[..., B]`` of per-prompt ``values [..., n]``."""
        return np.asarray(values, dtype=float) @ self.projection.T

    def bias(self, values) -> np.ndarray | float:
        """The bias statistic of ``values [..., n]``."""
        return bias_from_means(self.means(values), self.weights)

    def bootstrap(self, values, reps: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
        """Within-bucket bootstrap of the bias; ``values`` ``[n]`` or ``[k, n]`` (paired rows)."""
        v = np.atleast_2d(np.asarray(values, dtype=float))
        resamples = stratified_resamples(self.buckets, reps, seed)  # bucket order is kept, so labels are fixed
        labels = self.buckets[resamples[0]]
        boot = np.empty((v.shape[0], reps))
        for start in range(0, reps, 100):
            chunk = resamples[start:start + 100]
            proj = self._projections(chunk, labels)  # [chunk, B, n]
            means = np.einsum("rbn,krn->krb", proj, v[:, chunk])
            boot[:, start:start + len(chunk)] = bias_from_means(means, self.weights)
        point = np.atleast_1d(self.bias(v))
        lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
        out = {
            "bias": point.tolist() if len(point) > 1 else float(point[0]),
            "ci": [np.percentile(b, [lo, hi]).tolist() for b in boot] if len(point) > 1
            else np.percentile(boot[0], [lo, hi]).tolist(),
            "level": level,
            "reps": reps,
        }
        if len(point) == 2:
            out["diff"] = float(point[0] - point[1])
            out["diff_ci"] = np.percentile(boot[0] - boot[1], [lo, hi]).tolist()
        return out

    def noise_floor(self, values, reps: int = 200, seed: int = 0) -> dict:
        """The bias when bucket labels are shuffled (within strata when adjusted): noise alone."""
        values = np.asarray(values, dtype=float)
        rng = np.random.default_rng(seed)
        idx = np.arange(len(self.buckets))
        sims = np.empty(reps)
        for r in range(reps):
            labels = self.buckets.copy()
            if self.strata is None:
                labels = rng.permutation(labels)
            else:
                for s in set(self.strata.tolist()):
                    where = np.nonzero(self.strata == s)[0]
                    labels[where] = rng.permutation(labels[where])
            sims[r] = bias_from_means(values @ self._projection(idx, labels).T, self.weights)
        return {"mean": float(sims.mean()), "p95": float(np.percentile(sims, 95)), "reps": reps}


def bias_from_means(means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Bias from bucket means ``[..., buckets]`` and bucket weights ``[buckets]``."""
    axis_mean = (means * weights).sum(-1, keepdims=True)
    return np.abs(axis_mean - means).sum(-1)


def stratified_resamples(strata, reps: int, seed: int) -> np.ndarray:
    """``[reps, n]`` bootstrap index rows, each resampling within every stratum (strata in name order).

    Row ``r`` lists, stratum after stratum, indices drawn with replacement from that
    stratum's items, so position ``j`` always belongs to the same stratum.
    """
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    groups = [np.nonzero(strata == s)[0] for s in sorted(set(strata.tolist()))]
    return np.stack([np.concatenate([g[rng.integers(0, len(g), size=len(g))] for g in groups]) for _ in range(reps)])


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of bootstrap ``samples``."""
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return np.percentile(samples, [lo, hi]).tolist()
