"""What the no-harm guards cost, and whether they hold: one seed's AP choice with and without ``--guard``, on TEST.

Reads two comparisons of the same seed and method (``attnprune compare``): one run with
``--guard`` (its store is reused), one without. For both choices it measures, on the TEST
split and paired with the unrepaired model on the same items:

- the primary bias change (the search's axis);
- every guarded axis's bias change and StereoSet's error rate 100 - LMS (all bias types),
  each against its margin (``--guard-margin`` x the unrepaired test value): a guard holds on
  test when its paired 95% CI's upper end is within the margin.

Every test evaluation goes through the run's bench (stored under the comparison's own
labels), so what the guarded comparison measured is read back and only the unguarded
choice's other axes are new. Nothing here chooses anything; it reads test numbers only to
report them.

    .venv/bin/python benchmarks/guard_effect.py --guarded runs/compare-guard/runs/compare-smollm2-135m \\
        --unguarded benchmarks/results/compare/seed-16 --seed 16 [--method ap]

Writes ``benchmarks/results/guard_effect-seed<N>.json`` and ``.md`` (``-harm`` under ``--guard-test harm``,
``-margin<M>`` at a margin other than the default). An axis that ``--guard auto``
left out (one bucket, or under ``within`` its unrepaired bias within its noise floor on its guard prompts) is still
measured on test, and marked as not guarded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attnprune import labels
from attnprune.compare import read_comparison
from attnprune.heads import HeadMask
from attnprune.run import Run
from common import RESULTS, seed_config, write


def _row(name: str, t, margin: float, flip: bool = False) -> dict:
    """One guarded value's test change; ``flip`` for LMS (the guarded value is 100 - LMS, so its change is -LMS's)."""
    if flip:
        s = t.statistics["lms"]
        unrepaired, change, ci = 100 - s["unrepaired"], -s["change"], [-s["ci"][1], -s["ci"][0]]
    else:
        unrepaired, change, ci = t.unrepaired.bias, t.bias_change.absolute, t.bias_change.ci
    limit = margin * unrepaired
    # holds: shown within the limit (--guard-test within's question); harm: a rise beyond it shown (harm's)
    return {"guard": name, "unrepaired": unrepaired, "change": change, "ci": ci, "limit": limit,
            "holds": ci[1] <= limit, "harm": ci[0] > limit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guarded", type=Path, required=True, help="the --out directory of the guarded comparison")
    ap.add_argument("--unguarded", type=Path, required=True, help="the unguarded comparison (directory or json)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--method", default="ap")
    args = ap.parse_args()

    guarded, unguarded = read_comparison(args.guarded), read_comparison(args.unguarded)
    cfg = seed_config(guarded, args.seed, args.guarded / f"seed-{args.seed}")
    outcomes = {}
    for label, comparison in (("guarded", guarded), ("unguarded", unguarded)):
        entry = next(s for s in comparison.per_seed if s.seed == args.seed)
        outcomes[label] = entry.outcomes[args.method]

    rows = {}
    with Run.open(cfg, log=print) as run:
        for label, o in outcomes.items():
            if o.mask is None:  # no admissible candidate: the unrepaired model is kept, nothing changes
                rows[label] = None
                continue
            mask = HeadMask.from_dict(o.mask)
            primary = run.bench.compare(cfg.bias, [mask])[0]
            out = [dict(_row(cfg.axis, primary, float("nan")), holds=None)]
            for axis in cfg.guarded_axes:
                t = run.bench.compare(f"{cfg.bias}/{axis}", [mask], axis=axis, with_perplexity=False)[0]
                out.append(_row(axis, t, cfg.guard_margin))
            if labels.LMS_GUARD in cfg.guards:
                t = run.bench.compare(f"{args.method}/stereoset/all", [mask], bias="stereoset", axis="all",
                                      with_perplexity=False)[0]
                out.append(_row("lms (100 - LMS)", t, cfg.guard_margin, flip=True))
            rows[label] = {"heads": mask.n_pruned, "relative_primary_change": primary.bias_change.relative,
                           "perplexity_change": primary.perplexity_change, "rows": out,
                           "test_prompts": primary.setup.prompts,
                           # the guards measured on validation for the choice (--guard auto leaves some out)
                           "validation_guards": next((sorted(c.guards) for c in o.confirmation or []
                                                      if c.admissible and c.guards), None)}

    def cells(r, i):
        if r is None:
            return "no choice: unrepaired kept, +0.000 | yes"
        g = r["rows"][i]
        if g["guard"] in left_out:
            return f"{g['change']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] | (not guarded)"
        return (f"{g['change']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] | "
                f"{'yes' if g['holds'] else '**no**'}{' (a rise beyond it shown)' if g.get('harm') else ''}")

    def primary(r):
        return "no choice (unrepaired kept, +0.0%)" if r is None else \
            f"{r['heads']} heads, {100 * r['relative_primary_change']:+.1f}%"

    some = rows["unguarded"] or rows["guarded"]
    # the axes --guard auto left out on validation (at their noise floor): a chosen candidate held every guard
    # that was measured, so the guarded axes missing from its verdict are those left out
    measured = (rows["guarded"] or {}).get("validation_guards")
    left_out = [] if measured is None else [a for a in cfg.guarded_axes if a not in measured]
    given_up = (0 if rows["guarded"] is None else rows["guarded"]["relative_primary_change"]) - \
        (0 if rows["unguarded"] is None else rows["unguarded"]["relative_primary_change"])
    md = [f"# Guards on the test split: seed {args.seed}, {args.method}, `--guard {cfg.guard} --guard-test "
          f"{cfg.guard_test}` "
          f"(margin {100 * cfg.guard_margin:g}% of the unrepaired test value; "
          f"{cfg.guard_prompt_count} validation prompts per guarded axis at most)", "",
          f"Primary ({cfg.axis}, {some['test_prompts']} test prompts): guarded {primary(rows['guarded'])}; "
          f"unguarded {primary(rows['unguarded'])}; the guards gave up {100 * given_up:+.1f} points.", "",
          "A guard holds on test when the paired 95% CI's upper end is within the limit; a rise beyond the limit is "
          "shown when the CI's lower end is above it.", "",
          "| guard | unrepaired (test) | limit | guarded choice: change [paired 95% CI] | holds | "
          "unguarded choice: change [paired 95% CI] | holds |", "|---|---|---|---|---|---|---|"]
    for i, g in enumerate(some["rows"]):
        if i == 0:
            continue
        md.append(f"| {g['guard']} | {g['unrepaired']:.3f} | +{g['limit']:.3f} | {cells(rows['guarded'], i)} | "
                  f"{cells(rows['unguarded'], i)} |")
    text = "\n".join(md) + "\n"
    print(text)
    name = f"guard_effect-seed{args.seed}" + ("" if cfg.guard_test == "within" else f"-{cfg.guard_test}") + \
        ("" if cfg.guard_margin == type(cfg).guard_margin else f"-margin{cfg.guard_margin:g}")  # the default's
    write(name, {"seed": args.seed, "method": args.method, "guard": cfg.guard, "guard_margin": cfg.guard_margin,
                 "guard_test": cfg.guard_test,
                 "guard_prompts": cfg.guard_prompts, "not_guarded": left_out, "results": rows})
    (RESULTS / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
