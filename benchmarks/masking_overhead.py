"""Masking overhead on the default model (CPU), measured side by side in one run.

Compares, on the same token batch: no hooks vs a 10%-pruned mask (hooks installed), and
8 different masks as per-example masks in one batch of 8 rows vs 8 separate runs of one
row each. Prints tokens/s and ratios; writes benchmarks/results/masking_overhead.json.

    .venv/bin/python benchmarks/masking_overhead.py
"""

from __future__ import annotations

import numpy as np
import torch

from attnprune import HeadMask, HeadMasker, load_model
from common import best_of, write

BATCH, LENGTH, REPEATS = 8, 64, 5


def main() -> None:
    lm = load_model("smollm2-135m")
    lay = lm.layout
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (BATCH, LENGTH), generator=g)
    rng = np.random.default_rng(0)

    def random_mask(frac: float) -> HeadMask:
        k = int(frac * lay.n_total)
        return HeadMask.from_pruned(*lay.shape, [divmod(int(i), lay.n_heads) for i in rng.choice(lay.n_total, k, replace=False)])

    ten = random_mask(0.10)
    eight = [random_mask(0.10) for _ in range(BATCH)]
    stacked = torch.stack([m.tensor() for m in eight])
    model = lm.model

    def forward():
        with torch.no_grad():
            model(ids)

    masker = HeadMasker(model, lay)

    def separate():
        with torch.no_grad():
            for i, m in enumerate(eight):
                masker.set(m)
                model(ids[i:i + 1])

    # interleave the variants so that machine noise hits them alike
    t_plain, t_masked, t_batch, t_sep = [], [], [], []
    for _ in range(REPEATS):
        t_plain.append(best_of(forward, 1))  # no hooks installed
        with masker:
            masker.set(ten)
            t_masked.append(best_of(forward, 1))
            masker.set(stacked)
            t_batch.append(best_of(forward, 1))
            t_sep.append(best_of(separate, 1))
    tokens = BATCH * LENGTH
    res = {
        "setup": {"model": "smollm2-135m", "batch": BATCH, "length": LENGTH, "dtype": "float32", "repeats": REPEATS,
                  "statistic": "best of repeats, variants interleaved"},
        "tokens_per_s": {"unmasked": tokens / min(t_plain), "masked_10pct": tokens / min(t_masked),
                         "per_example_8_masks_one_batch": tokens / min(t_batch),
                         "8_separate_runs": tokens / min(t_sep)},
    }
    res["masking_overhead"] = min(t_masked) / min(t_plain) - 1
    res["per_example_speedup_vs_separate"] = min(t_sep) / min(t_batch)
    for k, v in res["tokens_per_s"].items():
        print(f"{k:32s} {v:8.0f} tokens/s")
    print(f"masking overhead (10% pruned vs no hooks): {100 * res['masking_overhead']:+.1f}%  (target <= 3%)")
    print(f"per-example masks, 8 in one batch vs 8 separate runs: {res['per_example_speedup_vs_separate']:.2f}x faster")
    write("masking_overhead", res)


if __name__ == "__main__":
    main()
