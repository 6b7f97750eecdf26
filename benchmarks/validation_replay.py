"""A method's search and choice replayed on a copy of a comparison's store, on validation data only.

For trying a change of a method on a store that already holds its design: the method proposes
again (what the store holds is read back, what the change asks for is evaluated and added to the
copy) and the shared policy chooses, with the confirmations. Nothing is measured on test and no
test number is read: the replay prints and writes the validation choice and the confirmation
table only, so it can be run on any seed's store (an evaluation seed replayed this way is no
longer evidence for the change, and the record must say so).

    cp -r /work/evalruns/seed-30 /work/devruns/seed-30-replay
    .venv/bin/python benchmarks/validation_replay.py /work/devruns/seed-30-replay --methods ap

Writes ``validation_replay.json`` into the copy's directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnprune.compare import propose_and_select, read_comparison
from attnprune.methods import MethodContext
from attnprune.run import Run
from attnprune.selection import SelectionPolicy
from common import seed_config


def replay(seed_dir: Path, methods: list[str]) -> dict:
    """Each of ``methods``' validation choice on the store of ``seed_dir`` (a one-seed comparison directory)."""
    comparison = read_comparison(seed_dir)
    seed = comparison.seeds[0]
    cfg = seed_config(comparison, seed, seed_dir / f"seed-{seed}")
    policy = SelectionPolicy.of(cfg)
    out = {"seed": seed, "rule": policy.rule(), "methods": {}}
    with Run.open(cfg, log=print) as run:
        base = run.base()
        ctx = MethodContext(run, policy, seed)
        for name in methods:
            a = propose_and_select(run, ctx, policy, name, base)
            proposal, selection = a.proposal, a.selection
            valid = selection.summary(policy)
            out["methods"][name] = {
                "evaluations": proposal.evaluations, "seconds": proposal.seconds, "notes": proposal.notes,
                "calibration": [c.to_dict() for c in getattr(proposal.details, "calibration", [])],
                "valid": None if valid is None else valid.to_dict(),
                "confirmation": [c.to_dict() for c in selection.candidates]}
            print(f"\n{name}: {proposal.notes}")
            for c in selection.candidates:
                print(f"  {len(c.pruned):2d} heads ({c.source}): search text {c.valid_perplexity:.2f}, confirmed "
                      f"{100 * c.confirmed_perplexity_change:+.2f}% (bound {100 * c.confirmed_perplexity_change_bound:+.2f}%)"
                      f", confirmed bias {c.confirmed_bias if c.confirmed_bias is None else round(c.confirmed_bias, 3)}"
                      f"{' admissible' if c.admissible else ''}")
            print(f"  choice: {'none' if valid is None else f'{valid.n_pruned} heads, confirmed bias {valid.confirmed.bias:.3f} at {100 * valid.confirmed.perplexity_change:+.2f}%'}"
                  f" (unrepaired confirmed bias {selection.base_confirmed.bias if selection.base_confirmed else float('nan'):.3f})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seed_dir", type=Path, help="a copy of a one-seed comparison directory (its store is added to)")
    ap.add_argument("--methods", default="ap", help="comma-separated methods to replay")
    args = ap.parse_args()
    result = replay(args.seed_dir, [m for m in args.methods.split(",") if m])
    path = args.seed_dir / "validation_replay.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
