"""Seconds of the bias statistics (bootstrap CI of a paired change, noise floor) vs number of prompts.

The template-adjusted bucket means are a two-way fixed-effects fit. The first version took a
pseudo-inverse of the ``n``-row design for every bootstrap resample; the current one solves
each resample on the ``(B + T - 1)``-square normal equations from weighted cell counts.
Both are timed side by side in this run (the old one on fewer resamples, per resample),
on synthetic per-prompt scores with the real gender_and_sex bucket/template labels of the
*validation* split (no test data is read), and their CIs compared for equality.

    .venv/bin/python benchmarks/bootstrap_scaling.py

Writes ``benchmarks/results/bootstrap_scaling.json``.
"""

from __future__ import annotations

import time

import numpy as np

from attnprune.data import holisticbias as hb
from attnprune.stats import BucketDesign, bias_from_means, stratified_resamples
from common import write


def pinv_bootstrap(design: BucketDesign, values: np.ndarray, reps: int, seed: int) -> np.ndarray:
    """The first version's resampling: a pseudo-inverse of the resampled ``n``-row design per resample."""
    resamples = stratified_resamples(design.buckets, reps, seed)
    labels = design.buckets[resamples[0]]
    onehot = (labels[:, None] == np.array(design.names)[None, :]).astype(float)
    levels = np.array(sorted(set(design.strata.tolist()))[1:])
    out = np.empty((values.shape[0], reps))
    for r, idx in enumerate(resamples):
        strata = (design.strata[idx][:, None] == levels[None, :]).astype(float)
        proj = np.linalg.pinv(np.concatenate([onehot, strata], axis=1))[: len(design.names)]
        out[:, r] = bias_from_means(values[:, idx] @ proj.T, design.weights)
    return out


def main() -> None:
    shares = hb.bucket_shares("gender_and_sex", "valid", 0)
    rng = np.random.default_rng(0)
    rows = []
    for n in (1_000, 2_500, 5_000, 10_000):
        prompts = hb.subset("gender_and_sex", "valid", n, 0)
        design = BucketDesign([p.bucket for p in prompts], shares, [p.template for p in prompts])
        values = rng.normal(size=(2, len(prompts)))
        t = time.perf_counter()
        boot = design.bootstrap(values, reps=1000, seed=1)
        fast = time.perf_counter() - t
        t = time.perf_counter()
        design.noise_floor(values[0], reps=200, seed=1)
        floor = time.perf_counter() - t
        old_reps = 20 if n <= 2_500 else 5
        t = time.perf_counter()
        old = pinv_bootstrap(design, values, old_reps, seed=1)
        old_per_rep = (time.perf_counter() - t) / old_reps
        new_first = design.bootstrap_biases(values, reps=old_reps, seed=1)
        rows.append({"prompts": len(prompts), "bootstrap_1000_s": fast, "noise_floor_200_s": floor,
                     "old_s_per_resample": old_per_rep, "new_s_per_resample": fast / 1000,
                     "speedup": old_per_rep / (fast / 1000), "max_abs_difference": float(np.abs(old - new_first).max()),
                     "ci": boot["ci"]})
        r = rows[-1]
        print(f"{r['prompts']:6d} prompts: bootstrap (1,000 resamples, 2 paired rows) {fast:6.2f} s, noise floor "
              f"(200) {floor:5.2f} s; per resample old {1000 * old_per_rep:8.1f} ms vs new {fast:5.2f} ms = "
              f"{r['speedup']:6.0f}x; same resamples differ by {r['max_abs_difference']:.1e}")
    write("bootstrap_scaling", {"rows": rows, "split": "valid (labels only; synthetic scores)"})


if __name__ == "__main__":
    main()
