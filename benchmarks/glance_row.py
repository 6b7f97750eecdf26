"""One evaluation seed's row of the README's "At a glance" table, from its ``comparison.json``.

Plain Python (no torch): it only reads what ``attnprune compare`` wrote, so it can run beside an evaluation seed.

    python3 benchmarks/glance_row.py benchmarks/results/compare/seed-41 [--budget 0.05]

Columns: seed (unrepaired test bias) | AP: heads, relative test bias change [paired 95% CI], test perplexity change
(one-sided 95% bound, marked "over" above the budget) | FASP, random_search, ap_paper: heads and change ("none": no
admissible candidate, the unrepaired model kept) | AP minus FASP [paired 95% CI], in points | AP / FASP evaluation
seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%".replace("+-", "-")


def _points(x: float) -> str:
    return f"{100 * x:+.1f}"


def _short(outcome: dict | None) -> str:
    if not outcome or not outcome.get("test"):
        return "none"
    return f"{outcome['valid']['n_pruned']}: {_pct(outcome['test']['bias_change']['relative'])}"


def row(path: Path, budget: float) -> str:
    """The README row of the one seed in ``path`` (a comparison directory or its json)."""
    if path.is_dir():
        path = path / "comparison.json"
    data = json.loads(path.read_text())
    if len(data["per_seed"]) != 1:
        raise SystemExit(f"{path} holds {len(data['per_seed'])} seeds; give a comparison of one seed.")
    seed = data["per_seed"][0]
    out = seed["outcomes"]
    ap = out["ap"]
    test = ap["test"]
    base = test["unrepaired"]["bias"]
    lo, hi = (c / base for c in test["bias_change"]["ci"])
    heads = ap["valid"]["n_pruned"]
    upper = test["perplexity_change_upper"]
    bound = f"{_pct(upper)}" if upper <= budget else f"**{_pct(upper)}, over**"
    ap_cell = (f"{heads} head{'s' if heads != 1 else ''}, **{_pct(test['bias_change']['relative'])}** "
               f"[{100 * lo:.1f}, {100 * hi:.1f}], {_pct(test['perplexity_change'])} ({bound})")
    minus = seed["ap_minus"]["fasp"]
    diff = (f"{_points(minus['difference'])} [{_points(minus['ci'][0])}, {_points(minus['ci'][1])}]"
            .replace("+-", "-"))
    ratio = ap["evaluation_seconds"] / out["fasp"]["evaluation_seconds"]
    cells = [f"{seed['seed']} ({base:.3f})", ap_cell, _short(out.get("fasp")), _short(out.get("random_search")),
             _short(out.get("ap_paper")), diff, f"{ratio:.2f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("comparison", type=Path, nargs="+", help="comparison directories (or their json), one seed each")
    ap.add_argument("--budget", type=float, default=0.05, help="the perplexity budget the bound is read against")
    args = ap.parse_args(argv)
    for p in args.comparison:
        print(row(p, args.budget))


if __name__ == "__main__":
    sys.exit(main())
