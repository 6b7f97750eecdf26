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

from statistics import NormalDist

import numpy as np


class BucketDesign:
    """The prompts' bucket (and optional template) labels and the bucket weights.

    ``means(values)`` maps per-prompt values ``[..., n]`` to bucket means ``[..., B]``
    (template-adjusted when ``strata`` is given) as one linear projection.

    Resamples and permutations are solved on the normal equations of the two-way design
    (bucket + template one-hot): a resample is a vector of item weights (how often each item
    was drawn), and its fit is a ``(B + T - 1)``-square system built from weighted cell
    counts, never a pseudo-inverse of the ``n``-row design. This is the same least-squares
    fit (the minimum-norm one when a resample misses a template), in time linear in ``n``.
    """

    def __init__(self, buckets, shares: dict[str, float] | None = None, strata=None):
        self.buckets = np.asarray(buckets)
        self.strata = None if strata is None else np.asarray(strata)
        self.names = sorted(set(self.buckets.tolist()))
        self.bucket_index_ = np.searchsorted(np.array(self.names), self.buckets)
        sizes = np.bincount(self.bucket_index_, minlength=len(self.names))
        w = np.array([shares[b] if shares else n for b, n in zip(self.names, sizes)], dtype=float)
        self.weights = w / w.sum()
        if self.strata is not None:
            levels = np.array(sorted(set(self.strata.tolist())))
            self.template_index_ = np.searchsorted(levels, self.strata)  # level 0 is the regression's reference
            self.n_templates_ = len(levels)
        self.projection = self._projection(self.bucket_index_)

    # ---- the fit, on item weights ------------------------------------------------------------
    def _normal_equations(self, weights: np.ndarray, bucket_index: np.ndarray) -> np.ndarray:
        """``[r, P, P]`` matrices ``X' W X`` of the design under item ``weights [r, n]``."""
        B = len(self.names)
        wb = _group_sums(weights, bucket_index, B)  # [r, B]
        if self.strata is None:
            return wb
        T = self.n_templates_
        cells = _group_sums(weights, bucket_index * T + self.template_index_, B * T).reshape(-1, B, T)[:, :, 1:]
        wt = cells.sum(1)  # [r, T-1]
        P = B + T - 1
        A = np.zeros((len(weights), P, P))
        A[:, np.arange(B), np.arange(B)] = wb
        A[:, np.arange(B, P), np.arange(B, P)] = wt
        A[:, :B, B:] = cells
        A[:, B:, :B] = cells.transpose(0, 2, 1)
        return A

    def _fit(self, weights: np.ndarray, values: np.ndarray, bucket_index: np.ndarray) -> np.ndarray:
        """Bucket means ``[k, r, B]`` of ``values [k, n]`` under item ``weights [r, n]`` and labels ``bucket_index``."""
        B = len(self.names)
        wv = weights[None, :, :] * values[:, None, :]  # [k, r, n]
        rb = _group_sums(wv, bucket_index, B)  # [k, r, B]
        A = self._normal_equations(weights, bucket_index)
        if self.strata is None:
            return rb / np.maximum(A, 1e-300)[None]
        rt = _group_sums(wv, self.template_index_, self.n_templates_)[..., 1:]
        rhs = np.concatenate([rb, rt], axis=-1)  # [k, r, P]
        return np.einsum("rpq,krq->krp", np.linalg.pinv(A, hermitian=True), rhs)[..., :B]

    def _projection(self, bucket_index: np.ndarray) -> np.ndarray:
        """``[B, n]`` matrix giving bucket means of values under bucket labels ``bucket_index``."""
        n = len(bucket_index)
        ones = np.ones((1, n))
        if self.strata is None:
            counts = np.bincount(bucket_index, minlength=len(self.names)).astype(float)
            return (np.arange(len(self.names))[:, None] == bucket_index[None, :]) / np.maximum(counts, 1)[:, None]
        B, T = len(self.names), self.n_templates_
        A = self._normal_equations(ones, bucket_index)[0]
        X = np.zeros((n, B + T - 1))
        X[np.arange(n), bucket_index] = 1.0
        ref = self.template_index_ > 0
        X[np.nonzero(ref)[0], B + self.template_index_[ref] - 1] = 1.0
        return (np.linalg.pinv(A, hermitian=True) @ X.T)[:B]

    def fitted(self, values) -> np.ndarray:
        """The fit's per-prompt values ``[n]`` (bucket effect + template effect) of ``values [n]``."""
        v = np.asarray(values, dtype=float)
        if self.strata is None:
            return self.means(v)[self.bucket_index_]
        B, T = len(self.names), self.n_templates_
        A = self._normal_equations(np.ones((1, len(v))), self.bucket_index_)[0]
        rhs = np.concatenate([_group_sums(v[None], self.bucket_index_, B)[0],
                              _group_sums(v[None], self.template_index_, T)[0, 1:]])
        beta = np.linalg.pinv(A, hermitian=True) @ rhs
        templates = np.concatenate([[0.0], beta[B:]])
        return beta[self.bucket_index_] + templates[self.template_index_]

    def noise_corrected(self, values) -> dict:
        """The between-bucket spread with the sampling noise of the bucket means taken out (Lum et al., FAccT 2022).

        ``between_sd`` is ``sqrt(sum_b w_b (m_b - m)^2)`` of the (template-adjusted) bucket means
        ``m_b`` around their weighted mean ``m``; noise inflates it by
        ``sum_b w_b [v_b (1 - 2 w_b) + sum_c w_c^2 v_c]``, with ``v_b`` each mean's sampling
        variance (heteroskedasticity-robust, from the fit's residuals). ``between_sd_corrected``
        subtracts that (floored at 0); unlike the raw statistic it does not shrink as prompts are
        added, so values at different prompt counts compare. ``excess`` is the raw bias minus its
        noise floor's expectation, in the bias statistic's own units.
        """
        v = np.asarray(values, dtype=float)
        m, w = self.means(v), self.weights
        var = (self.projection ** 2) @ (v - self.fitted(v)) ** 2  # [B]
        raw = float(np.sum(w * (m - np.sum(w * m)) ** 2))
        inflation = float(np.sum(w * (var * (1 - 2 * w) + np.sum(w ** 2 * var))))
        return {"between_sd": raw ** 0.5, "between_sd_corrected": max(raw - inflation, 0.0) ** 0.5,
                "noise_variance": inflation}

    # ---- statistics ----------------------------------------------------------------------------
    def means(self, values) -> np.ndarray:
        """Bucket means ``[..., B]`` of per-prompt ``values [..., n]``."""
        return np.asarray(values, dtype=float) @ self.projection.T

    def bias(self, values) -> np.ndarray | float:
        """The bias statistic of ``values [..., n]``."""
        return bias_from_means(self.means(values), self.weights)

    def bootstrap(self, values, reps: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
        """Within-bucket bootstrap of the bias; ``values`` ``[n]`` or ``[k, n]`` (paired rows)."""
        v = np.atleast_2d(np.asarray(values, dtype=float))
        boot = self.bootstrap_biases(v, reps, seed)
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

    def bootstrap_biases(self, values, reps: int = 1000, seed: int = 0) -> np.ndarray:
        """``[k, reps]`` bias of each row of ``values [k, n]`` under the same within-bucket resamples.

        The same ``seed`` gives the same resamples for any values on these prompts, so rows
        measured separately (two masks, two methods) pair up resample by resample.
        """
        v = np.atleast_2d(np.asarray(values, dtype=float))
        n = v.shape[1]
        resamples = stratified_resamples(self.buckets, reps, seed)  # within buckets: labels stay the items' own
        boot = np.empty((v.shape[0], reps))
        for start in range(0, reps, 100):
            chunk = resamples[start:start + 100]
            weights = np.stack([np.bincount(row, minlength=n) for row in chunk]).astype(float)
            means = self._fit(weights, v, self.bucket_index_)  # [k, chunk, B]
            boot[:, start:start + len(chunk)] = bias_from_means(means, self.weights)
        return boot

    def noise_floor(self, values, reps: int = 200, seed: int = 0) -> dict:
        """The bias when bucket labels are shuffled (within strata when adjusted): noise alone.

        A shuffle within strata keeps every (bucket, template) cell count, so all shuffles share
        the unrepaired labels' normal equations: one solve serves every replicate.
        """
        values = np.asarray(values, dtype=float)
        rng = np.random.default_rng(seed)
        levels = [] if self.strata is None else sorted(set(self.strata.tolist()))  # a fixed order in every process
        groups = None if self.strata is None else [np.nonzero(self.strata == s)[0] for s in levels]
        labels = np.empty((reps, len(values)), dtype=self.bucket_index_.dtype)
        for r in range(reps):
            if groups is None:
                labels[r] = rng.permutation(self.bucket_index_)
            else:
                labels[r] = self.bucket_index_
                for where in groups:
                    labels[r, where] = rng.permutation(self.bucket_index_[where])
        sims = bias_from_means(self._shuffled_means(values, labels), self.weights)
        return {"mean": float(sims.mean()), "p95": float(np.percentile(sims, 95)), "reps": reps}

    def _shuffled_means(self, values: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Bucket means ``[reps, B]`` of ``values [n]`` under each row of shuffled bucket ``labels [reps, n]``."""
        B, reps = len(self.names), len(labels)
        rows = np.repeat(np.arange(reps), labels.shape[1])
        rb = np.bincount(rows * B + labels.ravel(), weights=np.tile(values, reps), minlength=reps * B).reshape(reps, B)
        A = self._normal_equations(np.ones((1, len(values))), self.bucket_index_)[0]
        if self.strata is None:
            return rb / np.maximum(A, 1e-300)
        rt = _group_sums(values[None], self.template_index_, self.n_templates_)[0, 1:]
        rhs = np.concatenate([rb, np.broadcast_to(rt, (reps, len(rt)))], axis=-1)  # [reps, P]
        return (rhs @ np.linalg.pinv(A, hermitian=True).T)[:, :B]


def _group_sums(x: np.ndarray, index: np.ndarray, groups: int) -> np.ndarray:
    """Sums of ``x [..., n]`` over items with the same ``index [n]`` (0 <= index < groups): ``[..., groups]``."""
    flat = x.reshape(-1, x.shape[-1])
    out = np.zeros((flat.shape[0], groups))
    for g_start in range(0, flat.shape[0], 256):
        block = flat[g_start:g_start + 256]
        rows = np.repeat(np.arange(len(block)), block.shape[1])
        out[g_start:g_start + 256] = np.bincount(rows * groups + np.tile(index, len(block)), weights=block.ravel(),
                                                 minlength=len(block) * groups).reshape(len(block), groups)
    return out.reshape(*x.shape[:-1], groups)


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


def window_bootstrap(per_window, base_per_window, tokens: int, reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Perplexity change of one mask against another on the same text, with a bootstrap over its windows.

    ``per_window`` and ``base_per_window`` are the NLL sums of the same equal-length windows
    (each a contiguous block of text, so resampling whole windows is a block bootstrap);
    ``tokens`` is the number of scored tokens of all windows. Returns the relative change,
    its central ``level`` interval and its one-sided ``level`` upper bound.
    """
    d = np.asarray(per_window, dtype=float) - np.asarray(base_per_window, dtype=float)
    per_token = tokens / len(d)  # scored tokens per window: the change in log-perplexity is mean(d) / per_token
    change = float(np.expm1(d.mean() / per_token))
    if len(d) < 2:
        return {"change": change, "ci": [change, change], "upper": change, "windows": len(d), "reps": 0}
    idx = np.random.default_rng(seed).integers(0, len(d), size=(reps, len(d)))
    boot = np.expm1(d[idx].mean(1) / per_token)
    return {"change": change, "ci": percentile_ci(boot, level), "upper": float(np.percentile(boot, 100 * level)),
            "windows": len(d), "reps": reps}


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of bootstrap ``samples``."""
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return np.percentile(samples, [lo, hi]).tolist()


def detectable_change(ci, power: float = 0.8, level: float = 0.95) -> float:
    """The smallest true change a paired comparison with this ``level`` CI detects with ``power``.

    The minimum detectable effect of a two-sided test at ``1 - level``: ``(z_{(1+level)/2} +
    z_power) * SE``, with the standard error read off the CI's width under a normal
    approximation (``SE = (hi - lo) / (2 z_{(1+level)/2})``). A change smaller than this is
    missed more often than ``1 - power`` of the time: a CI that includes 0 then says "cannot
    tell", not "no change".
    """
    z = NormalDist()
    z_level = z.inv_cdf((1 + level) / 2)
    se = (ci[1] - ci[0]) / (2 * z_level)
    return float((z_level + z.inv_cdf(power)) * se)


def items_needed(items: int, detectable: float, target: float) -> int:
    """Items a paired comparison needs to detect ``target`` when ``items`` of them detect ``detectable``.

    The standard error falls as ``1 / sqrt(items)``, so the items scale with
    ``(detectable / target) ** 2``; rounded up.
    """
    return int(np.ceil(items * (detectable / abs(target)) ** 2))
