"""How far the test text's perplexity change strays from the confirmation text's, for AP's confirmed candidates.

An analysis of evaluation seeds after the fact: it reads test perplexities only to report them
and chooses nothing (no default, threshold or design comes from it).

1. ``--comparisons``: for each comparison directory (one seed each), AP's choice's perplexity
   change on the confirmation text (and its one-sided bound) beside its change on the test text,
   both as recorded; the spread of test minus confirmation over the seeds.
2. ``--measure SEED_DIR``: every candidate AP confirmed on that seed (a comparison's
   ``seed-N`` directory; its store is opened, nothing is added), measured for perplexity on the
   seed's test text: does the test text read higher for all of them (the texts differ) or only
   for the choice (selection)?

    .venv/bin/python benchmarks/confirmation_vs_test.py \\
        --comparisons benchmarks/results/compare/seed-17,...,seed-29 --measure /work/evalruns/seed-29

Writes ``benchmarks/results/confirmation_vs_test.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from attnprune.compare import read_comparison
from attnprune.heads import HeadMask
from attnprune.run import Run
from common import seed_config, write


def recorded(paths: list[Path]) -> list[dict]:
    """AP's choice per seed: confirmation change and bound, test change (as each comparison recorded them)."""
    out = []
    for path in paths:
        for s in read_comparison(path).per_seed:
            o = s.outcomes.get("ap")
            if o is None or o.valid is None or o.valid.confirmed is None or o.test is None:
                continue
            k = o.valid.confirmed
            out.append({"seed": s.seed, "confirmation": k.perplexity_change, "bound": k.perplexity_change_bound,
                        "test": o.test.perplexity_change, "test_minus_confirmation": o.test.perplexity_change
                        - k.perplexity_change})
    return out


def measured(seed_dir: Path) -> list[dict]:
    """Every candidate AP confirmed on the seed of ``seed_dir``, on that seed's test text (stored there)."""
    comparison = read_comparison(seed_dir)
    seed = comparison.seeds[0]
    cfg = seed_config(comparison, seed, seed_dir / f"seed-{seed}")
    candidates = comparison.per_seed[0].outcomes["ap"].confirmation
    out = []
    with Run.open(cfg, log=print) as run:
        shape = run.shape
        masks = [HeadMask.from_pruned(*shape, [tuple(p) for p in c.pruned]) for c in candidates]
        ev, _ = run.evaluator(run.spec("test", ppl_tokens=cfg.test_ppl_tokens))
        # perplexity only, not stored: the test bias of these masks is not needed here
        scores = ev.ppl_measure.score([HeadMask.all_active(*shape), *masks])
        for c, score in zip(candidates, scores[1:]):
            test = score["perplexity"] / scores[0]["perplexity"] - 1  # as the comparison reports a test change
            out.append({"heads": len(c.pruned), "source": c.source, "admissible": c.admissible,
                        "confirmation": c.confirmed_perplexity_change, "bound": c.confirmed_perplexity_change_bound,
                        "test": test, "test_minus_confirmation": test - c.confirmed_perplexity_change})
            print(f"{len(c.pruned)} heads ({c.source}, admissible {c.admissible}): confirmation "
                  f"{100 * c.confirmed_perplexity_change:+.2f}% (bound {100 * c.confirmed_perplexity_change_bound:+.2f}%),"
                  f" test {100 * test:+.2f}%")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comparisons", default="", help="comma-separated comparison directories (one seed each)")
    ap.add_argument("--measure", type=Path, default=None, help="a comparison directory whose AP candidates to measure")
    args = ap.parse_args()
    result: dict = {"split": "test (reported only; nothing is chosen from it)"}
    if args.comparisons:
        rows = recorded([Path(p) for p in args.comparisons.split(",")])
        diffs = np.array([r["test_minus_confirmation"] for r in rows])
        for r in rows:
            print(f"seed {r['seed']}: confirmation {100 * r['confirmation']:+.2f}% (bound {100 * r['bound']:+.2f}%), "
                  f"test {100 * r['test']:+.2f}%")
        print(f"test minus confirmation over {len(rows)} seeds: mean {100 * diffs.mean():+.2f}, sd "
              f"{100 * diffs.std(ddof=1):.2f} points, range {100 * diffs.min():+.2f} to {100 * diffs.max():+.2f}")
        result["choices"] = {"rows": rows, "mean": float(diffs.mean()), "sd": float(diffs.std(ddof=1))}
    if args.measure is not None:
        rows = measured(args.measure)
        diffs = np.array([r["test_minus_confirmation"] for r in rows])
        print(f"{len(rows)} candidates: test minus confirmation {100 * diffs.min():+.2f} to {100 * diffs.max():+.2f} "
              f"points, mean {100 * diffs.mean():+.2f}")
        result["candidates"] = {"comparison": str(args.measure), "rows": rows, "mean": float(diffs.mean())}
    write("confirmation_vs_test", result)


if __name__ == "__main__":
    main()
