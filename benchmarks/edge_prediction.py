"""Score the prediction registered in ``benchmarks/results/compare/PLAN.md`` on the batch's religion arms (issue 20).

The prediction: on an evaluation seed's religion arm, religion's TEST change under AP's unguarded
choice has a paired 95% CI above zero (a shown rise) if AP's mask prunes a head of the first or
the last layer, and a lower end at or below zero otherwise. It was formed from seeds 27, 37, 38, 39
and 41 (and development seeds 0-2), so those are listed apart and not scored.

Reads each seed's ``benchmarks/results/compare/seed-N/comparison.json`` (AP's mask) and its arm's
``benchmarks/results/guard_effect-seedN-*.json`` (the unguarded choice's religion row); JSON only,
nothing is evaluated, nothing is chosen.

    python3 benchmarks/edge_prediction.py [--axis religion]

Prints a table and writes ``benchmarks/results/edge_prediction.json``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FORMED_FROM = (27, 37, 38, 39, 41)  # the evaluation seeds the hypothesis was formed from (not scored)


def edge_heads(mask: dict) -> list[list[int]]:
    """The heads of ``mask`` (a mask dict) in its first or last layer."""
    last = mask["layers"] - 1
    return [list(h) for h in mask["pruned"] if h[0] in (0, last)]


def seed_rows(axis: str) -> list[dict]:
    """Every evaluation seed with a comparison and a religion arm: its AP mask's edge heads and the axis's test change."""
    out = []
    for arm in sorted(RESULTS.glob("guard_effect-seed*.json")):
        seed = int(re.match(r"guard_effect-seed(\d+)", arm.name).group(1))
        comparison = RESULTS / "compare" / f"seed-{seed}" / "comparison.json"
        if not comparison.is_file():
            continue
        mask = json.loads(comparison.read_text())["per_seed"][0]["outcomes"]["ap"]["mask"]
        rows = json.loads(arm.read_text())["results"]["unguarded"]["rows"]
        row = next((r for r in rows if r["guard"] == axis), None)
        if mask is None or row is None:
            continue
        edge = edge_heads(mask)
        rose = row["ci"][0] > 0
        out.append({"seed": seed, "arm": arm.name, "heads": len(mask["pruned"]), "edge_heads": edge,
                    "change": row["change"], "ci": row["ci"], "rose": rose, "predicted_rise": bool(edge),
                    "agrees": rose == bool(edge), "scored": seed not in FORMED_FROM})
    return sorted(out, key=lambda r: (r["seed"], r["arm"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--axis", default="religion")
    args = ap.parse_args()
    rows = seed_rows(args.axis)
    print(f"| seed | AP heads | of them in the first or last layer | {args.axis} test change [paired 95% CI] | "
          "shown rise | predicted | agrees |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        edge = ", ".join(f"{l}:{h}" for l, h in r["edge_heads"]) or "none"
        print(f"| {r['seed']}{'' if r['scored'] else ' (formed the hypothesis)'} | {r['heads']} | {edge} | "
              f"{r['change']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {'yes' if r['rose'] else 'no'} | "
              f"{'rise' if r['predicted_rise'] else 'none'} | {'yes' if r['agrees'] else '**no**'} |")
    scored = [r for r in rows if r["scored"]]
    print(f"\nscored seeds: {sum(r['agrees'] for r in scored)} of {len(scored)} agree")
    path = RESULTS / "edge_prediction.json"
    path.write_text(json.dumps({"axis": args.axis, "formed_from": FORMED_FROM, "rows": rows,
                                "scored": len(scored), "agree": sum(r["agrees"] for r in scored)}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
