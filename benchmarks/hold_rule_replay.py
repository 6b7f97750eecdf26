"""What the test-text bound (``--hold-tokens``) does to the recorded choices of evaluation seeds, after the fact.

An analysis of evaluation seeds that ran with the bound on the change itself (``hold_tokens`` 0):
it chooses nothing and tunes nothing (the rule follows from the target "the test text's own
one-sided bound within the budget", see :func:`attnprune.selection.perplexity_change_bound`). For
each comparison directory, AP's last confirmed candidates, as recorded: their bound under the new
rule (the recorded bound gives the standard error), which of the admissible ones it keeps, and
what it would pick among them (lowest confirmed bias). Not replayed: the calibration a seed whose
candidates all fail would run (a new search), so "none" means "calibrates", not "keeps the
unrepaired model".

    .venv/bin/python benchmarks/hold_rule_replay.py benchmarks/results/compare/seed-17 ... seed-29

Writes ``benchmarks/results/hold_rule_replay.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write  # noqa: E402

from attnprune.compare import read_comparison  # noqa: E402
from attnprune.selection import bound_quantile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("comparisons", nargs="+", type=Path)
    ap.add_argument("--hold-tokens", type=int, default=32768)
    ap.add_argument("--confirm-tokens", type=int, default=8160, help="scored tokens of the confirmation text")
    args = ap.parse_args()
    rows = []
    for path in args.comparisons:
        comparison = read_comparison(path)
        confidence, tau = comparison.config["confidence"], comparison.config["tau"]
        for s in comparison.per_seed:
            o = s.outcomes.get("ap")
            if o is None:
                continue
            windows = s.validation.setup.perplexity_inputs["windows"]
            q = bound_quantile(confidence, windows)  # the recorded bound's (on the change itself)
            factor = bound_quantile(confidence, windows, args.confirm_tokens, args.hold_tokens)
            chosen = o.mask["pruned"] if o.mask else None
            cands = []
            for c in o.confirmation:
                change = math.log1p(c.confirmed_perplexity_change)
                se = (math.log1p(c.confirmed_perplexity_change_bound) - change) / q
                cands.append({"heads": len(c.pruned), "confirmed_bias": c.confirmed_bias,
                              "change": c.confirmed_perplexity_change, "bound": c.confirmed_perplexity_change_bound,
                              "test_text_bound": math.expm1(change + factor * se), "admissible": c.admissible,
                              "chosen": c.pruned == chosen})
            kept = [c for c in cands if c["admissible"] and c["test_text_bound"] <= tau]
            pick = min(kept, key=lambda c: c["confirmed_bias"]) if kept else None
            test = o.test.perplexity_change if o.test is not None and chosen else None
            rows.append({"seed": s.seed, "candidates": cands, "admissible_before": sum(c["admissible"] for c in cands),
                         "admissible_after": len(kept), "pick": pick,
                         "choice_kept": bool(pick and pick["chosen"]), "recorded_test_change": test})
            old = next((c for c in cands if c["chosen"]), None)
            print(f"seed {s.seed}: choice " + ("none" if old is None else
                  f"{old['heads']} heads, confirmed {100 * old['change']:+.2f}% (bound {100 * old['bound']:+.2f}%, "
                  f"test-text bound {100 * old['test_text_bound']:+.2f}%)")
                  + f"; admissible {len(kept)} of {rows[-1]['admissible_before']} -> "
                  + ("none (calibrates)" if pick is None else "the same choice" if pick["chosen"] else
                     f"{pick['heads']} heads at {100 * pick['change']:+.2f}% (bound {100 * pick['test_text_bound']:+.2f}%), "
                     f"confirmed bias {old['confirmed_bias']:.3f} -> {pick['confirmed_bias']:.3f}"))
    write("hold_rule_replay", {"hold_tokens": args.hold_tokens, "confirm_tokens": args.confirm_tokens, "seeds": rows})


if __name__ == "__main__":
    main()
