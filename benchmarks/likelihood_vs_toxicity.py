"""Does the fast `likelihood` measure track the paper's `toxicity` protocol?

On the default model, 1 unrepaired + 30 random masks (1-20% of heads pruned), both
measures on the same validation prompts of gender_and_sex; reports the Spearman rank
correlation across masks between likelihood bias and toxicity bias (and mean toxicity).
Writes benchmarks/results/likelihood_vs_toxicity.json.

    .venv/bin/python benchmarks/likelihood_vs_toxicity.py [--prompts 128] [--masks 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from attnprune import load_model
from attnprune.backend import Backend
from attnprune.measures import get_measure
from attnprune.methods.samplers import random_masks
from common import write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--masks", type=int, default=30)
    ap.add_argument("--classifier", default="hatesonar")
    args = ap.parse_args()
    lm = load_model("smollm2-135m")
    masks = random_masks(args.masks, lm.layout.shape, 0.01, 0.20, seed=7)
    backend = Backend(lm)
    lik = get_measure("likelihood", prompts=args.prompts).prepare(backend)
    tox = get_measure("toxicity", prompts=args.prompts, classifier=args.classifier).prepare(backend)
    assert [p.text for p in lik.prompts_] == [p.text for p in tox.prompts_]
    t = time.perf_counter()
    rows = []
    for i, m in enumerate(masks):
        lb = lik.score([m])[0]
        tb = tox.score([m])[0]
        rows.append({"n_pruned": m.n_pruned, "likelihood_bias": lb["bias"], "toxicity_bias": tb["bias"],
                     "mean_toxicity": tb["mean_toxicity"], "likelihood_mean_score": lb["mean_score"]})
        print(f"{i:3d} pruned {m.n_pruned:3d}: likelihood {lb['bias']:.3f}  toxicity {tb['bias']:.4f} "
              f"(mean tox {tb['mean_toxicity']:.4f})  {time.perf_counter() - t:.0f} s", flush=True)
    col = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    res = {
        "setup": {"model": "smollm2-135m", "axis": "gender_and_sex", "split": "valid", "prompts": len(lik.prompts_),
                  "masks": len(masks), "mask_seed": 7, "pruning": "1-20% random", "classifier": args.classifier,
                  "toxicity": tox.describe()},
        "spearman": {
            "likelihood_bias_vs_toxicity_bias": float(spearmanr(col["likelihood_bias"], col["toxicity_bias"]).statistic),
            "likelihood_score_vs_mean_toxicity": float(spearmanr(col["likelihood_mean_score"], col["mean_toxicity"]).statistic),
            "n_pruned_vs_toxicity_bias": float(spearmanr(col["n_pruned"], col["toxicity_bias"]).statistic),
        },
        "rows": rows,
    }
    for k, v in res["spearman"].items():
        print(f"Spearman {k}: {v:+.2f}")
    write("likelihood_vs_toxicity", res)


if __name__ == "__main__":
    main()
