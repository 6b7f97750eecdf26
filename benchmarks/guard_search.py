"""AP with ``--guard-search`` against today's AP on development seeds: does carrying religion into the search stop the rise?

Issue 20: AP's gender repairs raise religion's bias (five evaluation seeds of six on test, and
development seeds 0 and 1 on validation), and a validation guard in the choice never caught it.
``--guard-search`` carries a guarded axis into the annealing (first-order shifts of its bucket
means, from the search half of its validation split); the guard then reads the confirmation half.

For each development seed: AP with ``--guard religion --guard-search --guard-margin M --guard-test
harm --guard-prompts ALL`` in a fresh store (``--out``/seed-N; read back on a rerun), its confirmed
choice, and today's choice (kept in ``--today``, an ``ap_variant.py`` result) measured beside it on
the same data: religion on its confirmation half (the guard's prompts, paired with the unrepaired
model; two-sided 95% interval of the guards' bootstrap) and the search's axis on the confirmation
data (bias change relative to the unrepaired model, perplexity change). Validation only.

    .venv/bin/python benchmarks/guard_search.py [--seeds 0] [--margin 0]
        [--today benchmarks/results/ap_variant-protect-first-last.json] [--out runs/guard-search]

Writes ``benchmarks/results/guard_search.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ap_variant import arm
from attnprune import load_model
from attnprune.config import RepairConfig
from attnprune.heads import HeadMask
from attnprune.run import Run, change_bounds, guarded_values
from common import development_seeds, machine, write

ALL = 10 ** 6  # more prompts than a half holds: all of it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated development seeds")
    ap.add_argument("--axis", default="religion", help="the guarded axis")
    ap.add_argument("--margin", type=float, default=0.0, help="--guard-margin")
    ap.add_argument("--today", type=Path, default=Path("benchmarks/results/ap_variant-protect-first-last.json"),
                    help="an ap_variant.py result whose 'today' arm holds today's choice per seed")
    ap.add_argument("--out", default="runs/guard-search", help="a store per seed (seed-N)")
    ap.add_argument("--name", default="guard_search")
    args = ap.parse_args()
    seeds = development_seeds(args.seeds)
    today = {r["seed"]: r["today"]["chosen"] for r in json.loads(args.today.read_text())["seeds"]}
    lm = load_model("smollm2-135m")
    rows = []
    for seed in seeds:
        cfg = RepairConfig(seed=seed, out=str(Path(args.out) / f"seed-{seed}"), checks="none", export=False,
                           guard=args.axis, guard_search=True, guard_margin=args.margin, guard_test="harm",
                           guard_prompts=ALL)
        searched = arm(cfg, lm)
        for private in ("_scores", "_measure"):
            searched.pop(private, None)
        with Run.open(cfg, loaded=lm, log=print) as run:
            masks = {"today": HeadMask.from_pruned(*run.shape, [tuple(h) for h in today[seed]["pruned"]])}
            if searched["chosen"]:
                masks["guard-search"] = HeadMask.from_pruned(*run.shape, [tuple(h) for h in searched["chosen"]["pruned"]])
            base = HeadMask.all_active(*run.shape)
            ev, setting = run.evaluator(run.guard_spec(args.axis), with_perplexity=False)
            got = run.stored_rows(ev, setting, "confirm", f"guard:{args.axis}", list(masks.values()),
                                  with_perplexity=False, log_name=args.axis)
            values, boot = guarded_values(args.axis, ev, [got[base], *(got[m] for m in masks.values())])
            confirmed, unrepaired = run.confirm(list(masks.values()), "guard_search")
            out = {}
            for i, ((name, m), k) in enumerate(zip(masks.items(), confirmed), start=1):
                change = float(values[i] - values[0])
                lower, upper = change_bounds(change, boot[i] - boot[0], 0.975)
                out[name] = {"heads": m.n_pruned, "pruned": m.pruned, args.axis: {"change": change, "ci": [lower, upper]},
                             "relative_bias_change": k.bias / unrepaired.bias - 1,
                             "perplexity_change": k.perplexity / unrepaired.perplexity - 1}
                print(f"seed {seed} {name} ({m.n_pruned} heads): {args.axis} {change:+.3f} [{lower:+.3f}, {upper:+.3f}]"
                      f" from {values[0]:.3f}; {cfg.axis} {100 * out[name]['relative_bias_change']:+.1f}%, perplexity "
                      f"{100 * out[name]['perplexity_change']:+.1f}% (confirmation data)")
            rows.append({"seed": seed, "prompts": ev.describe()["bias_inputs"]["prompts"],
                         "unrepaired": float(values[0]), "masks": out, "guard_search_run": searched})
    write(args.name, {"machine": machine(), "split": "valid (development seeds)", "axis": args.axis,
                      "margin": args.margin, "today_from": str(args.today),
                      "interval": "two-sided 95%, paired bootstrap", "seeds": rows})


if __name__ == "__main__":
    main()
