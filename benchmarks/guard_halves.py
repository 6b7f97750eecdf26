"""How sure a guard can be of a rise: a guarded axis on its confirmation half alone, or on both halves of validation.

A guarded axis is never the search's, so neither the search nor a confirmation reads its
prompts, and a guard may take both halves of its validation split (today's guards do, up to
``--guard-prompts``). This measures what that buys on development seeds: for AP's choice on
each seed (read from an ``ap_variant.py`` result, its today's arm), each axis's change against
the unrepaired model on (a) the confirmation half's prompts and (b) all of the axis's validation
prompts, with the guards' one-sided bounds (``run.change_bounds`` at ``--confidence``). Every
evaluation goes into a run directory per seed (``--out``), so a rerun reads them back.
Validation data only, development seeds only.

    .venv/bin/python benchmarks/guard_halves.py --choices benchmarks/results/ap_variant-trim1-tau5.json \\
        --axes religion [--out runs/guard-halves]

Writes ``benchmarks/results/guard_halves.json``.
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

ALL = 10 ** 6  # more prompts than any axis's split holds: all of it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--choices", type=Path, required=True, help="an ap_variant.py result (its arms' chosen masks)")
    ap.add_argument("--axes", default="religion", help="comma-separated guarded axes")
    ap.add_argument("--out", default="runs/guard-halves", help="a run directory per seed (seed-N) for the evaluations")
    args = ap.parse_args()
    rows_in = json.loads(args.choices.read_text())["seeds"]
    lm = load_model("smollm2-135m")
    out = []
    for row in rows_in:
        seed, chosen = row["seed"], row["today"]["chosen"]
        if seed not in DEVELOPMENT_SEEDS:
            raise SystemExit(f"only development seeds {DEVELOPMENT_SEEDS} may be read here")
        cfg = RepairConfig(seed=seed, out=str(Path(args.out) / f"seed-{seed}"), checks="none", export=False)
        with Run.open(cfg, loaded=lm, log=print) as run:
            mask = HeadMask.from_pruned(*run.shape, [tuple(p) for p in chosen["pruned"]])
            base = HeadMask.all_active(*run.shape)
            for axis in args.axes.split(","):
                for name, part in (("confirmation half", "confirm"), ("both halves", None)):
                    spec = run.spec("valid", axis=axis, prompts=ALL, bootstrap_reps=VALID_BOOTSTRAP_REPS, part=part)
                    ev, setting = run.evaluator(spec, with_perplexity=False)
                    got = run.stored_rows(ev, setting, "confirm", labels.guard(axis), [mask], with_perplexity=False,
                                          log_name=f"{axis}, {name}")
                    values, boot = guarded_values(axis, ev, [got[base], got[mask]])
                    change = float(values[1] - values[0])
                    lower, upper = change_bounds(change, boot[1] - boot[0], cfg.confidence)
                    r = {"seed": seed, "heads": mask.n_pruned, "axis": axis, "prompts": name,
                         "n": ev.describe()["bias_inputs"]["prompts"], "unrepaired": float(values[0]),
                         "change": change, "lower": lower, "upper": upper}
                    out.append(r)
                    print(f"seed {seed}, {axis}, {name} ({r['n']} prompts): unrepaired {r['unrepaired']:.3f}, change "
                          f"{change:+.3f}, one-sided {100 * cfg.confidence:.0f}% bounds [{lower:+.3f}, {upper:+.3f}]")
    write("guard_halves", {"split": "valid (development seeds)", "choices": str(args.choices),
                           "confidence": RepairConfig().confidence, "rows": out})


if __name__ == "__main__":
    main()
