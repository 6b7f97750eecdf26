"""What measuring a confirmation's perplexity first saves, side by side in one run, on the default model.

The choice takes a confirmed candidate only when its perplexity bound holds the budget, so a
confirmation measures perplexity first and the bias only then (``Run.confirm`` with the
policy's ``holds_budget``). This confirms the same masks twice, each time in a fresh store
(the unrepaired model first, so both pay the same warm-up): once measuring both at once, once
perplexity first. It prints the seconds of each, their ratio, how many masks had their bias
skipped, and checks that both make the same choice.

The masks are random masks of ``--heads`` heads (AP's confirmed candidates prune 3-20), so
some hold the budget and some do not. Development seed 0, validation data only; nothing here
reads a test split.

    .venv/bin/python benchmarks/perplexity_first.py [--heads 2,5,8,12,16,20] [--per-size 1]

Writes ``benchmarks/results/perplexity_first.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile

import numpy as np

from attnprune import HeadMask, load_model
from attnprune.config import RepairConfig
from attnprune.run import Run
from attnprune.selection import SelectionPolicy
from common import seconds_of, write


def confirm_all(lm, cfg: RepairConfig, masks: list[HeadMask], needs_bias) -> tuple[float, list, object]:
    """(seconds of the masks' confirmations, their rows, the unrepaired row) in a fresh store."""
    with tempfile.TemporaryDirectory(prefix="perplexity_first-") as tmp:
        with Run.open(dataclasses.replace(cfg, out=tmp), loaded=lm, log=lambda s: None) as run:
            run.confirm([], "bench")  # the unrepaired model (and the evaluator's warm-up), not timed
            out: dict = {}
            seconds = seconds_of(lambda: out.update(rows=run.confirm(masks, "bench", needs_bias)))
            rows, base = out["rows"]
    return seconds, rows, base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="2,5,8,12,16,20", help="comma-separated head counts of the random masks")
    ap.add_argument("--per-size", type=int, default=1, help="random masks of each head count")
    args = ap.parse_args()
    lm = load_model("smollm2-135m")
    L, H = lm.layout.shape
    rng = np.random.default_rng(0)
    masks = [HeadMask.from_pruned(L, H, [divmod(int(c), H) for c in rng.choice(L * H, k, replace=False)])
             for k in map(int, args.heads.split(",")) for _ in range(args.per_size)]
    cfg = RepairConfig()
    policy = SelectionPolicy.of(cfg)
    whole_s, whole, base_w = confirm_all(lm, cfg, masks, None)
    first_s, first, base_f = confirm_all(lm, cfg, masks, policy.holds_budget)
    rows = []
    for m, w, f in zip(masks, whole, first):
        holds = policy.holds_budget(w, base_w)
        assert math.isclose(w.perplexity, f.perplexity, rel_tol=1e-9), "the same confirmation text"
        assert holds == policy.holds_budget(f, base_f)
        assert (not holds and math.isnan(f.bias)) or math.isclose(w.bias, f.bias, rel_tol=1e-9)
        rows.append({"heads": m.n_pruned, "perplexity_change": w.perplexity / base_w.perplexity - 1,
                     "holds_budget": holds, "seconds_whole": w.seconds, "seconds_perplexity_first": f.seconds})
        print(f"{m.n_pruned:2d} heads: perplexity {100 * rows[-1]['perplexity_change']:+.1f}% "
              f"({'within' if holds else 'over'} the budget at the bound): both at once {w.seconds:.1f} s, "
              f"perplexity first {f.seconds:.1f} s")
    skipped = sum(not r["holds_budget"] for r in rows)
    print(f"{len(masks)} confirmations ({skipped} over the budget, bias skipped): both at once {whole_s:.0f} s, "
          f"perplexity first {first_s:.0f} s, ratio {first_s / whole_s:.2f}")
    write("perplexity_first", {"setup": {"model": "smollm2-135m", "split": "valid", "seed": cfg.seed,
                                         "tau": cfg.tau, "confidence": cfg.confidence,
                                         "confirm_prompts": cfg.confirm_prompts,
                                         "confirm_ppl_tokens": cfg.confirm_ppl_tokens},
                               "rows": rows, "seconds_whole": whole_s, "seconds_perplexity_first": first_s,
                               "ratio": first_s / whole_s, "bias_skipped": skipped})


if __name__ == "__main__":
    main()
