"""Can AP's search see a guarded axis coming? First-order estimates of religion's bias change, checked on fresh prompts.

Issue 20: AP's gender repairs raise religion's bias on test (five evaluation seeds of six),
and no validation guard caught it in the choice. A guard the search itself carries would
need a cheap prediction of a mask's change on the guarded axis. The likelihood measure has
first-order removal estimates (one gradient pass gives every head's shift of every prompt's
log-odds), so a guarded axis's bucket means, and its spread statistic, can be predicted for
any mask by adding the pruned heads' shifts. This checks that prediction before building on
it, on development seeds and validation data only:

- every head's first-order shift of religion's bucket means, from the *search* half of
  religion's validation split, as ``--guard-search`` reads it (``Run.guard_removal_estimates``,
  ``methods.ap.GuardPrediction``);
- the predicted change of religion's bias for a set of masks: each seed's AP choices kept in
  ``benchmarks/results`` (today's, ``--protect 0,-1``'s, the edge-head variants of
  ``edge_heads.py``) and ``--random`` masks of the same sizes drawn uniformly;
- each mask's measured change on the *confirmation* half (paired with the unrepaired model on
  the same prompts; two-sided 95% interval, the guards' bootstrap), which the estimates never read.

    .venv/bin/python benchmarks/guard_first_order.py [--seeds 0,1,2] [--axis religion] [--random 2]
        [--out runs/guard-first-order] [--name guard_first_order]

Writes ``benchmarks/results/NAME.json``: per mask the prediction and the measurement, per seed
and overall the rank correlation and how many measured rises were predicted as rises.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from attnprune import labels, load_model
from attnprune.config import RepairConfig
from attnprune.heads import HeadMask
from attnprune.methods.ap import GuardPrediction
from attnprune.run import VALID_BOOTSTRAP_REPS, Run, change_bounds, guarded_values
from common import development_seeds, RESULTS, machine, write

ALL = 10 ** 6  # more prompts than a half holds: all of it


def kept_masks(seed: int) -> dict[str, list[list[int]]]:
    """The masks of development seed ``seed`` that earlier benchmarks kept (name -> pruned heads)."""
    out: dict[str, list[list[int]]] = {}
    for name, arms in (("ap_variant-trim1-tau5", ("today",)), ("ap_variant-protect-first-last", ("today", "variant"))):
        for row in json.loads((RESULTS / f"{name}.json").read_text())["seeds"]:
            for arm in arms:
                chosen = row["seed"] == seed and (row.get(arm) or {}).get("chosen")
                if chosen:
                    out[f"{name}:{arm}"] = chosen["pruned"]
    for name in ("edge_heads", "edge_heads-protect"):
        for row in json.loads((RESULTS / f"{name}.json").read_text())["rows"]:
            if row["seed"] == seed:
                out[f"{name}:other ({row['other_is']})"] = row["other"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated development seeds")
    ap.add_argument("--axis", default="religion")
    ap.add_argument("--random", type=int, default=2, help="uniform random masks per seed, of the kept masks' sizes")
    ap.add_argument("--out", default="runs/guard-first-order", help="a run directory per seed for the evaluations")
    ap.add_argument("--name", default="guard_first_order")
    args = ap.parse_args()
    seeds = development_seeds(args.seeds)
    lm = load_model("smollm2-135m")
    rows, pooled = [], []
    for seed in seeds:
        cfg = RepairConfig(seed=seed, out=str(Path(args.out) / f"seed-{seed}"), checks="none", export=False,
                           guard_prompts=ALL)
        with Run.open(cfg, loaded=lm, log=print) as run:
            masks = {k: HeadMask.from_pruned(*run.shape, [tuple(h) for h in v]) for k, v in kept_masks(seed).items()}
            rng = np.random.default_rng(1000 + seed)
            sizes = sorted({m.n_pruned for m in masks.values()})
            for i in range(args.random):
                k = sizes[i % len(sizes)]
                cells = rng.choice(run.shape[0] * run.shape[1], size=k, replace=False)
                masks[f"random {i + 1}"] = HeadMask.from_pruned(*run.shape, [divmod(int(c), run.shape[1]) for c in cells])
            base = HeadMask.all_active(*run.shape)
            # the estimates: religion's search half (what --guard-search reads), through the search's own code
            stored = run.guard_removal_estimates(args.axis)
            guard = GuardPrediction(args.axis, stored, margin=0.0)
            print(f"seed {seed}: {args.axis}'s search half ({stored['prompts']} prompts): unrepaired bias "
                  f"{stored['bias']:.3f} (its bucket means' spread {guard.base:.3f}); {stored['seconds']:.0f} s")
            # the measurement: the confirmation half, never read by the estimates
            ev, setting = run.evaluator(run.spec("valid", axis=args.axis, prompts=ALL, part="confirm",
                                                 bootstrap_reps=VALID_BOOTSTRAP_REPS), with_perplexity=False)
            got = run.stored_rows(ev, setting, "confirm", labels.guard(args.axis), list(masks.values()),
                                  with_perplexity=False, log_name=args.axis)
            values, boot = guarded_values(args.axis, ev, [got[base], *(got[m] for m in masks.values())])
            out = []
            for i, (name, m) in enumerate(masks.items(), start=1):
                predicted = float(guard.change(torch.as_tensor(m.bits)[None])[0])
                change = float(values[i] - values[0])
                lower, upper = change_bounds(change, boot[i] - boot[0], 0.975)
                out.append({"mask": name, "heads": m.n_pruned, "pruned": m.pruned, "predicted_change": predicted,
                            "measured_change": change, "ci": [lower, upper]})
                print(f"seed {seed} {name} ({m.n_pruned} heads): predicted {predicted:+.3f}, measured {change:+.3f} "
                      f"[{lower:+.3f}, {upper:+.3f}]")
            pooled += out
            p, q = [x["predicted_change"] for x in out], [x["measured_change"] for x in out]
            rows.append({"seed": seed, "search_prompts": stored["prompts"],
                         "confirm_prompts": ev.describe()["bias_inputs"]["prompts"],
                         "unrepaired_search": stored["bias"], "unrepaired_confirm": float(values[0]),
                         "estimate_seconds": stored["seconds"], "spearman": float(spearmanr(p, q).statistic), "masks": out})
    p = np.array([x["predicted_change"] for x in pooled])
    q = np.array([x["measured_change"] for x in pooled])
    rises = [x for x in pooled if x["ci"][0] > 0]
    summary = {"masks": len(pooled), "spearman": float(spearmanr(p, q).statistic),
               "pearson": float(np.corrcoef(p, q)[0, 1]), "mean_abs_error": float(np.mean(np.abs(p - q))),
               "measured_rises": len(rises), "measured_rises_predicted_as_rises": sum(x["predicted_change"] > 0
                                                                                   for x in rises),
               "predicted_rises": int((p > 0).sum())}
    print(json.dumps(summary, indent=1))
    write(args.name, {"machine": machine(), "split": "valid (development seeds): estimates on the search half, "
                      "measurements on the confirmation half", "axis": args.axis,
                      "interval": "two-sided 95%, paired bootstrap", "summary": summary, "seeds": rows})


if __name__ == "__main__":
    main()
