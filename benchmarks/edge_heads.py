"""Does AP's gender repair raise religion's bias through the heads it prunes in the first and last layers?

A prediction registered in ``benchmarks/results/compare/PLAN.md`` (issue 20): religion's bias rises
when AP's chosen mask prunes a head of layer 0 or of the last layer, and not otherwise. This
checks the mechanism on development seeds, validation data only. For each seed's AP choice (an
``ap_variant.py`` result, its ``--arm``: today's by default, or a variant's, such as ``--protect 0,-1``):

- a choice with such heads ("edge heads") is measured beside the same mask without them;
- a choice without any is measured beside the same mask with ``--add`` heads added;

each on all of religion's validation prompts (both halves, as today's guards read them), paired
with the unrepaired model on the same prompts: religion's change for each mask and the difference
of the two masks, with two-sided 95% intervals (the guards' median-centred bootstrap spread,
``run.change_bounds``). And what the edge heads do for the repair itself: each mask on the
confirmation data of the search's axis (bias and perplexity change against the unrepaired model).
Every evaluation goes into a run directory per seed (``--out``), so a rerun reads them back.

    .venv/bin/python benchmarks/edge_heads.py --choices benchmarks/results/ap_variant-trim1-tau5.json \\
        [--arm today|variant] [--axis religion] [--add 0:4,29:2] [--out runs/edge-heads] [--name edge_heads]

Writes ``benchmarks/results/NAME.json`` (default ``edge_heads.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnprune import labels, load_model
from attnprune.config import RepairConfig
from attnprune.heads import HeadMask
from attnprune.run import VALID_BOOTSTRAP_REPS, Run, change_bounds, guarded_values
from common import DEVELOPMENT_SEEDS, write
from edge_prediction import edge_heads

ALL = 10 ** 6  # more prompts than any axis's split holds: all of it


def other_mask(mask: HeadMask, add: list[tuple[int, int]]) -> tuple[str, HeadMask]:
    """The mask ``mask`` is compared with: without its edge heads, or (when it has none) with ``add`` added."""
    pruned = mask.pruned
    edge = [tuple(h) for h in edge_heads(mask.to_dict())]
    if edge:
        return "without its edge heads", HeadMask.from_pruned(*mask.shape, [h for h in pruned if h not in edge])
    return "with edge heads added", HeadMask.from_pruned(*mask.shape, sorted({*pruned, *add}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--choices", type=Path, required=True, help="an ap_variant.py result (its arms' chosen masks)")
    ap.add_argument("--arm", default="today", choices=["today", "variant"], help="which arm's choice of --choices")
    ap.add_argument("--axis", default="religion", help="the axis the prediction is about")
    ap.add_argument("--add", default="0:4,29:2", help="layer:head pairs added to a choice without edge heads")
    ap.add_argument("--out", default="runs/edge-heads", help="a run directory per seed (seed-N) for the evaluations")
    ap.add_argument("--name", default="edge_heads", help="the result's name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    add = [tuple(int(x) for x in pair.split(":")) for pair in args.add.split(",") if pair]
    rows_in = json.loads(args.choices.read_text())["seeds"]
    lm = load_model("smollm2-135m")
    out = []
    for row in rows_in:
        seed, chosen = row["seed"], row[args.arm]["chosen"]
        if seed not in DEVELOPMENT_SEEDS:
            raise SystemExit(f"only development seeds {DEVELOPMENT_SEEDS} may be read here")
        if chosen is None:
            print(f"seed {seed}: the {args.arm} arm chose nothing")
            continue
        cfg = RepairConfig(seed=seed, out=str(Path(args.out) / f"seed-{seed}"), checks="none", export=False)
        with Run.open(cfg, loaded=lm, log=print) as run:
            mask = HeadMask.from_pruned(*run.shape, [tuple(p) for p in chosen["pruned"]])
            arm, other = other_mask(mask, add)
            base = HeadMask.all_active(*run.shape)
            spec = run.spec("valid", axis=args.axis, prompts=ALL, bootstrap_reps=VALID_BOOTSTRAP_REPS)
            ev, setting = run.evaluator(spec, with_perplexity=False)
            got = run.stored_rows(ev, setting, "confirm", labels.guard(args.axis), [mask, other],
                                  with_perplexity=False, log_name=args.axis)
            values, boot = guarded_values(args.axis, ev, [got[base], got[mask], got[other]])
            measured = {}
            for name, i, j in (("choice", 1, 0), ("other", 2, 0), ("choice minus other", 1, 2)):
                change = float(values[i] - values[j])
                lower, upper = change_bounds(change, boot[i] - boot[j], 0.975)
                measured[name] = {"change": change, "ci": [lower, upper]}
            confirmed, unrepaired = run.confirm([mask, other], "edge_heads")
            primary = {name: {"heads": r.mask.n_pruned, "relative_bias_change": r.bias / unrepaired.bias - 1,
                              "perplexity_change": r.perplexity / unrepaired.perplexity - 1}
                       for name, r in zip(("choice", "other"), confirmed)}
            r = {"seed": seed, "arm": args.arm, "axis": args.axis, "prompts": ev.describe()["bias_inputs"]["prompts"],
                 "choice": mask.pruned, "other_is": arm, "other": other.pruned, "unrepaired": float(values[0]),
                 args.axis: measured, "primary (confirmation data)": primary}
            out.append(r)
            print(f"seed {seed}: {args.axis} ({r['prompts']} prompts, unrepaired {values[0]:.3f}): choice "
                  f"({mask.n_pruned} heads) {measured['choice']['change']:+.3f}, {arm} ({other.n_pruned}) "
                  f"{measured['other']['change']:+.3f}, difference {measured['choice minus other']['change']:+.3f} "
                  f"[{measured['choice minus other']['ci'][0]:+.3f}, {measured['choice minus other']['ci'][1]:+.3f}]; "
                  f"{cfg.axis} on confirmation data: choice {100 * primary['choice']['relative_bias_change']:+.1f}% "
                  f"(ppl {100 * primary['choice']['perplexity_change']:+.1f}%), other "
                  f"{100 * primary['other']['relative_bias_change']:+.1f}% "
                  f"(ppl {100 * primary['other']['perplexity_change']:+.1f}%)")
    write(args.name, {"split": "valid (development seeds)", "choices": str(args.choices), "arm": args.arm,
                         "edge_layers": "first and last", "interval": "two-sided 95%, paired bootstrap", "rows": out})


if __name__ == "__main__":
    main()
