"""The paper's toxicity measure: the reweighted estimator against direct generation, mask by mask.

For masks of 1 to 30 heads (seeded random, development seed 0, validation prompts only):

- **direct**: fresh continuations under the mask (common random numbers: the same uniforms
  as the unrepaired model's), classified;
- **reweighted**: the unrepaired model's continuations, classified once, weighted by the
  mask's likelihood ratio (one teacher-forced pass; ``--estimator reweighted``).

Per mask: each estimator's paired change of the bias against the unrepaired model (95%
bootstrap CI over prompts), the mean toxicity, the ESS, and the seconds the mask cost. The
precision per CPU second of the paired change is ``1 / (CI width^2 x seconds)``; the ratio
reweighted / direct is measured in the same run, side by side.

    .venv/bin/python benchmarks/toxicity_estimator.py [--prompts 200] [--model smollm2-135m]

Writes ``benchmarks/results/toxicity_estimator.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from attnprune import HeadMask, load_model
from attnprune.backend import Backend
from attnprune.measures import get_measure

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write  # noqa: E402

HEADS = (1, 3, 10, 30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--classifier", default="hatesonar")
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device)
    shape = lm.layout.shape
    backend = Backend(lm)
    tox = get_measure("toxicity", prompts=args.prompts, seed=0, classifier=args.classifier, estimator="reweighted",
                      min_ess=0.0).prepare(backend)
    rng = np.random.default_rng(0)
    masks = []
    for k in HEADS:
        flat = rng.choice(shape[0] * shape[1], k, replace=False)
        masks.append(HeadMask.from_pruned(*shape, [divmod(int(i), shape[1]) for i in flat]))
    t = time.perf_counter()
    tox.proposal()
    proposal_seconds = time.perf_counter() - t
    unrepaired = tox.summarize(tox.proposal_["texts"])  # the direct numbers of the unrepaired model
    base_scores = np.array(unrepaired["per_prompt"])
    rows = []
    cache = Path(__file__).resolve().parent.parent / "runs" / "toxicity_estimator"
    cache.mkdir(parents=True, exist_ok=True)
    for m in masks:
        # direct generations are the slow side and do not depend on the estimator: kept between runs
        saved = cache / f"direct-{args.model.replace('/', '_')}-{args.prompts}-{args.classifier}-{m.key}.json"
        if saved.is_file():
            kept = json.loads(saved.read_text())
            direct, direct_s = tox.summarize(kept["texts"]), kept["seconds"]
        else:
            t = time.perf_counter()
            texts = tox.generate([m])[0]
            direct = tox.summarize(texts)
            direct_s = time.perf_counter() - t
            saved.write_text(json.dumps({"texts": texts, "seconds": direct_s}))
        t = time.perf_counter()
        rew = tox.reweighted([m])[0]
        rew_s = time.perf_counter() - t
        row = {"heads": m.n_pruned, "mask": m.to_dict(lm.name)}
        for name, res, sec in (("direct", direct, direct_s), ("reweighted", rew, rew_s)):
            pd = tox.paired_difference(np.array(res["per_prompt"]), base_scores)  # mask - unrepaired
            width = pd["diff_ci"][1] - pd["diff_ci"][0]
            row[name] = {"bias": res["bias"], "change": pd["diff"], "change_ci": list(pd["diff_ci"]),
                         "mean_toxicity": res["mean_toxicity"], "seconds": sec,
                         "precision_per_second": 1.0 / (width ** 2 * sec) if width > 0 else float("inf")}
        row["reweighted"]["ess"] = rew["ess"]
        d, r = row["direct"], row["reweighted"]
        row["agree"] = bool(d["change_ci"][0] <= r["change"] <= d["change_ci"][1]
                            and r["change_ci"][0] <= d["change"] <= r["change_ci"][1])
        row["precision_ratio"] = r["precision_per_second"] / d["precision_per_second"]
        rows.append(row)
        print(f"{m.n_pruned:3d} heads: direct change {d['change']:+.4f} [{d['change_ci'][0]:+.4f}, "
              f"{d['change_ci'][1]:+.4f}] {d['seconds']:.0f} s; reweighted {r['change']:+.4f} "
              f"[{r['change_ci'][0]:+.4f}, {r['change_ci'][1]:+.4f}] {r['seconds']:.0f} s, ESS "
              f"{r['ess']['overall']:.2f} (smallest bucket {r['ess']['smallest_bucket']:.2f}); agree {row['agree']}; "
              f"precision per second x{row['precision_ratio']:.1f}", flush=True)
    setup = tox.describe()
    write("toxicity_estimator", {"setup": setup, "unrepaired": {"bias": unrepaired["bias"], "ci": unrepaired["ci"],
                                                                 "noise_floor": unrepaired["noise_floor"]["mean"],
                                                                 "mean_toxicity": unrepaired["mean_toxicity"]},
                                 "proposal_seconds": proposal_seconds, "rows": rows})
    lines = [f"# The reweighted toxicity estimator against direct generation ({lm.name})", "",
             f"{setup['prompts']} validation prompts of {setup['axis']} (development seed 0), one continuation each, "
             f"{setup['classifier']} on the continuation, identity words {setup['identity_words']}. Unrepaired bias "
             f"{unrepaired['bias']:.4f} [{unrepaired['ci'][0]:.4f}, {unrepaired['ci'][1]:.4f}], noise floor "
             f"{unrepaired['noise_floor']['mean']:.4f}. The proposal (sampling and classifying the unrepaired "
             f"model's continuations once) took {proposal_seconds:.0f} s.", "",
             "| heads | direct change [95% CI] | s | reweighted change [95% CI] | s | ESS (smallest bucket) | agree | "
             "precision per second, reweighted / direct |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        d, r = row["direct"], row["reweighted"]
        lines.append(f"| {row['heads']} | {d['change']:+.4f} [{d['change_ci'][0]:+.4f}, {d['change_ci'][1]:+.4f}] | "
                     f"{d['seconds']:.0f} | {r['change']:+.4f} [{r['change_ci'][0]:+.4f}, {r['change_ci'][1]:+.4f}] | "
                     f"{r['seconds']:.0f} | {r['ess']['overall']:.2f} ({r['ess']['smallest_bucket']:.2f}) | "
                     f"{'yes' if row['agree'] else 'no'} | x{row['precision_ratio']:.1f} |")
    (RESULTS / "toxicity_estimator.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
