"""Does the choice keep its perplexity promise on text it never saw? The confirmation rule at several confidences.

For each finished repair given (development seeds only), from its ``report.json``: every confirmed
candidate's perplexity change on the confirmation half of validation and the standard error of that
change (read off its one-sided bound at the run's confidence, Student's t over the windows, and with
``hold_tokens`` the test text's noise and margin that the rule adds). For each
confidence asked for, the rule's choice among the same candidates (lowest confirmed bias whose bound
is within the budget) and the chance that a test measurement of the run's test text (its window count,
windows of the same length, other documents) puts that choice's one-sided 95% bound within the budget:

    P = Phi((log(1 + tau) - change - t95 * se_test) / sqrt(se_confirm^2 + se_test^2))

with ``se_test = se_confirm * sqrt(confirm windows / test windows)``: the change is known only to the
confirmation's precision, and the test adds its own noise and its own margin. A shift between the
validation and the test documents is not in it, so P is an upper estimate. Nothing here reads a test
split: the test's window count comes from the run's configuration.

Also each run's mean gap between its search candidates' perplexity change on the confirmation text and on the
search text they were chosen on (the winner's curse of the search's perplexity text).

Candidates that a higher confidence would send to AP's calibration (a new search) are not replayed here;
rerun the repair on a copy of the store for that (the store keeps every evaluation).

    .venv/bin/python benchmarks/perplexity_promise.py runs/dev-seed1 runs/dev-seed2 --confidences 0.8,0.9,0.95
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from scipy.stats import norm
from scipy.stats import t as student_t

sys.path.insert(0, str(Path(__file__).parent))
from common import DEVELOPMENT_SEEDS, write  # noqa: E402

from attnprune.selection import bound_quantile  # noqa: E402


def candidates_of(report: dict) -> tuple[dict, list[dict]]:
    """The run's confirmation setup and its candidates, each with its log-change and standard error."""
    conf = report["validation"]["confirmation"]
    windows = conf["setup"]["perplexity_inputs"]["windows"]
    # the bound's multiple of the standard error, with the test text's part where the run held the bound there
    hold = report["config"].get("hold_tokens") or 0
    tokens = conf["setup"]["perplexity_inputs"]["tokens_scored"] if hold > 0 else 0
    q = bound_quantile(report["config"]["confidence"], windows, tokens, hold)
    out = []
    for c in conf["candidates"]:
        change = math.log1p(c["confirmed_perplexity_change"])
        se = (math.log1p(c["confirmed_perplexity_change_bound"]) - change) / q
        out.append({"heads": len(c["pruned"]), "source": c["source"], "bias": c["confirmed_bias"],
                    "change": change, "se": se,
                    "search_change": math.log(c["valid_perplexity"] / report["validation"]["unrepaired"]["perplexity"])})
    return {"windows": windows, "unrepaired_bias": conf["unrepaired"]["bias"]}, out


def promise(report: dict, confidences: list[float], test_tokens: int | None = None) -> dict:
    """Per confidence: the choice among the run's confirmed candidates and its chance of holding on test."""
    cfg = report["config"]
    setup, cands = candidates_of(report)
    tau = cfg["tau"]
    test_windows = max(2, (test_tokens or cfg["test_ppl_tokens"]) // 256)
    t95 = float(student_t.ppf(0.95, test_windows - 1))
    rows = []
    for level in confidences:
        q = float(student_t.ppf(level, setup["windows"] - 1))
        # a candidate whose bound missed the run's budget has no confirmed bias (measured perplexity first): at a
        # lower confidence than the run's it may be admissible here but cannot be ranked, so it is left out
        ok = [c for c in cands if c["change"] + q * c["se"] <= math.log1p(tau) and c["bias"] is not None
              and c["bias"] < setup["unrepaired_bias"]]
        pick = min(ok, key=lambda c: c["bias"]) if ok else None
        row = {"confidence": level, "admissible": len(ok), "chosen": None}
        if pick is not None:
            se_test = pick["se"] * math.sqrt(setup["windows"] / test_windows)
            p = float(norm.cdf((math.log1p(tau) - pick["change"] - t95 * se_test) / math.hypot(pick["se"], se_test)))
            row["chosen"] = {"heads": pick["heads"], "source": pick["source"], "confirmed_bias": pick["bias"],
                             "bias_change": pick["bias"] / setup["unrepaired_bias"] - 1,
                             "perplexity_change": math.expm1(pick["change"]),
                             "bound": math.expm1(pick["change"] + q * pick["se"]), "se": pick["se"],
                             "p_test_bound_within_budget": p}
        rows.append(row)
    searched = [c for c in cands if c["source"].startswith("candidate")]
    gap = math.expm1(sum(c["change"] - c["search_change"] for c in searched) / len(searched)) if searched else None
    return {"seed": cfg["seed"], "tau": tau, "confirm_windows": setup["windows"], "test_windows": test_windows,
            "unrepaired_confirmed_bias": setup["unrepaired_bias"], "candidates": len(cands), "rule": rows,
            "ppl_prior_tokens": cfg.get("ppl_prior_tokens", 0), "search_candidates": len(searched),
            "search_to_confirmation_gap": gap,
            "confirmed": [{"heads": c["heads"], "source": c["source"], "confirmed_bias": c["bias"],
                           "search_perplexity_change": math.expm1(c["search_change"]),
                           "confirmed_perplexity_change": math.expm1(c["change"])} for c in cands]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="repair output directories (development seeds only)")
    ap.add_argument("--confidences", default="0.8,0.9,0.95")
    ap.add_argument("--test-ppl-tokens", type=int, default=None,
                    help="test perplexity tokens to plan for (default: the run's --test-ppl-tokens)")
    ap.add_argument("--name", default="perplexity_promise", help="results file name under benchmarks/results")
    a = ap.parse_args()
    levels = [float(x) for x in a.confidences.split(",")]
    out = []
    for run in a.runs:
        report = json.loads((Path(run) / "report.json").read_text())
        if report["config"]["seed"] not in DEVELOPMENT_SEEDS:
            sys.exit(f"{run} is seed {report['config']['seed']}, an evaluation seed; this study reads development "
                     f"seeds {DEVELOPMENT_SEEDS} only.")
        res = {"run": run, **promise(report, levels, a.test_ppl_tokens)}
        out.append(res)
        print(f"{run} (seed {res['seed']}, --ppl-prior-tokens {res['ppl_prior_tokens']}; {res['candidates']} confirmed "
              f"candidates; {res['confirm_windows']} confirmation windows, {res['test_windows']} test windows)")
        if res["search_to_confirmation_gap"] is not None:
            print(f"  the {res['search_candidates']} search candidates' perplexity change was "
                  f"{100 * res['search_to_confirmation_gap']:+.2f} points higher on the confirmation text than on the "
                  "search text (mean, log scale)")
        for r in res["rule"]:
            c = r["chosen"]
            print(f"  confidence {r['confidence']:.2f}: {r['admissible']} admissible"
                  + (f"; chosen {c['heads']} heads ({c['source']}), confirmed bias {c['confirmed_bias']:.3f} "
                     f"({100 * c['bias_change']:+.1f}%), perplexity {100 * c['perplexity_change']:+.2f}% (bound "
                     f"{100 * c['bound']:+.2f}%), P(test 95% bound within budget) {c['p_test_bound_within_budget']:.2f}"
                     if c else "; nothing admissible (AP would calibrate: rerun on a copy of the store)"))
    write(a.name, {"runs": out, "confidences": levels})


if __name__ == "__main__":
    main()
