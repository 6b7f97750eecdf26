"""How often a confirmatory batch of evaluation seeds would show AP ahead, for the designs considered in PLAN.md.

Resamples the per-seed paired differences (AP minus each method, relative test bias change) of finished evaluation
seeds (default 31-39, which are in no batch) and applies each design's test to every resample:

- ``fixed10`` / ``fixed15``: Student's t over 10 (15) seeds, two-sided 95%;
- ``OBF 10/15``: looks at 10 and 15 seeds with O'Brien-Fleming-type two-sided levels 0.0054 and 0.0492 (overall
  about 0.05 for a normal statistic; the t at 9 and 14 df stands in for it);
- ``OBF 5/10/15`` and ``Pocock 5/10/15``: three looks (levels 0.0005/0.014/0.045, and 0.022 at each);
- ``... + sign``: a look passes only if the sign test (how many differences are negative, exact binomial) passes at
  the same level too, which no skew can fool.

"power": the share of resamples whose test shows AP ahead (the CI's upper end below zero) by the last look; "type I":
the same share when the differences are centred on zero (a null with the observed skew), and under a symmetric,
heavy-tailed null (Student's t with 3 df). Plain numbers about the design, read before the batch: nothing here
chooses a method or reads a batch seed.

    .venv/bin/python benchmarks/batch_power.py [--seeds 31-39] [--reps 40000]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy import stats

from common import RESULTS, write

DESIGNS = {"fixed10": ((10,), (0.05,)), "fixed15": ((15,), (0.05,)), "OBF 10/15": ((10, 15), (0.0054, 0.0492)),
           "OBF 5/10/15": ((5, 10, 15), (0.0005, 0.014, 0.045)), "Pocock 5/10/15": ((5, 10, 15), (0.022,) * 3),
           "fixed10 + sign": ((10,), (0.05,)), "OBF 10/15 + sign": ((10, 15), (0.0054, 0.0492))}


def shown_ahead(sample: np.ndarray, looks, levels, sign: bool = False) -> tuple[float, float]:
    """(share of rows whose t-test shows a negative mean by the last look, mean seeds used) for ``sample [reps, n]``.

    ``sign``: a look shows AP ahead only if the sign test (negatives among the differences, two-sided exact
    binomial, a zero counted against AP) also passes at that look's level.
    """
    decided = np.zeros(len(sample), bool)
    ahead = np.zeros(len(sample), bool)
    used = np.full(len(sample), float(looks[-1]))
    for n, level in zip(looks, levels):
        y = sample[:, :n]
        sd = y.std(1, ddof=1)
        t = np.divide(y.mean(1), sd / np.sqrt(n), out=np.zeros(len(y)), where=sd > 0)
        stop = ~decided & (np.abs(t) > stats.t.ppf(1 - level / 2, n - 1))
        if sign:
            negatives = (y < 0).sum(1)
            stop &= np.minimum(1.0, 2 * stats.binom.sf(negatives - 1, n, 0.5)) < level
        ahead |= stop & (t < 0)
        used[stop] = n
        decided |= stop
    return float(ahead.mean()), float(used.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="31-39", help="finished evaluation seeds, as FIRST-LAST")
    ap.add_argument("--reps", type=int, default=40000)
    args = ap.parse_args()
    first, last = (int(s) for s in args.seeds.split("-"))
    diffs: dict[str, list[float]] = {}
    for seed in range(first, last + 1):
        data = json.loads((RESULTS / "compare" / f"seed-{seed}" / "comparison.json").read_text())
        for method, v in data["per_seed"][0]["ap_minus"].items():
            diffs.setdefault(method, []).append(100 * v["difference"])
    rng = np.random.default_rng(0)
    most = max(looks[-1] for looks, _ in DESIGNS.values())
    heavy = rng.standard_t(3, (args.reps, most))
    out = {"seeds": args.seeds, "reps": args.reps, "methods": {}}
    for method, x in diffs.items():
        x = np.asarray(x)
        alt = rng.choice(x, (args.reps, most))
        null = rng.choice(x - x.mean(), (args.reps, most))
        rows = {}
        for name, (looks, levels) in DESIGNS.items():
            sign = name.endswith("+ sign")
            power, seeds_used = shown_ahead(alt, looks, levels, sign)
            rows[name] = {"power": power, "mean_seeds": seeds_used,
                          "type_i_skewed_null": shown_ahead(null, looks, levels, sign)[0],
                          "type_i_t3_null": shown_ahead(heavy, looks, levels, sign)[0]}
            print(f"AP minus {method:13s} {name:15s} power {power:.2f} (mean seeds {seeds_used:.1f}); one-sided type I:"
                  f" skewed null {rows[name]['type_i_skewed_null']:.3f}, t3 null {rows[name]['type_i_t3_null']:.3f}")
        out["methods"][method] = {"differences": [round(v, 2) for v in x], "mean": float(x.mean()),
                                  "sd": float(x.std(ddof=1)), "designs": rows}
    write("batch_power", out)


if __name__ == "__main__":
    main()
