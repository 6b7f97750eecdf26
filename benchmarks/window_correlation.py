"""Are the perplexity windows of a confirmation independent, as the choice's bound assumes?

Report only: it reads the validation confirmations already in evaluation seeds' stores (nothing is
evaluated, nothing is chosen). For every confirmed mask, the per-window change in mean token NLL
from the unrepaired model (the differences :func:`attnprune.selection.window_differences` bounds)
gives two standard errors of the mean change: the independent-window one the bound uses, and a
batch-means one over consecutive blocks of ``--block`` windows, which grows when neighbouring
windows move together. Their ratio near 1 (mean square over a seed's masks) says the bound's
noise model holds; AP's own confirmed masks are listed with theirs.

    python benchmarks/window_correlation.py --stores /work/evalruns/seed-34,/work/evalruns/seed-37

(a comparison's run directory: its ``seed-N/store.sqlite`` is opened read-only). Plain Python.
Writes ``benchmarks/results/window_correlation.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def confirmations(store: Path) -> tuple[list[float], int, dict[str, tuple[str, int, list[float]]]]:
    """(unrepaired per-window NLL sums, their scored tokens, {mask key: (source, heads, per-window sums)})."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    rows = {}
    for key, source, heads, detail in db.execute(
            "select mask_key, source, n_pruned, detail from evaluations where split = 'confirm'"):
        ppl = (json.loads(detail) if detail else {}).get("perplexity") or {}
        if ppl.get("per_window"):
            rows[key] = (source, heads, ppl["per_window"], ppl["tokens"])
    db.close()
    base = next(r for r in rows.values() if r[1] == 0)
    return base[2], base[3], {k: r[:3] for k, r in rows.items() if r[1] > 0}


def standard_errors(d: list[float], block: int) -> tuple[float, float]:
    """(independent-window, batch-means) standard error of the mean of ``d``."""
    se = statistics.stdev(d) / math.sqrt(len(d))
    means = [statistics.mean(d[i:i + block]) for i in range(0, len(d) - block + 1, block)]
    return se, statistics.stdev(means) / math.sqrt(len(means))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", required=True, help="comma-separated comparison run directories (one seed each)")
    ap.add_argument("--block", type=int, default=4, help="windows per batch mean")
    args = ap.parse_args()
    out = []
    for run_dir in map(Path, args.stores.split(",")):
        (store,) = run_dir.glob("seed-*/store.sqlite")
        base, tokens, masks = confirmations(store)
        per_token = tokens / len(base)
        ratios = []
        for source, heads, windows in masks.values():
            d = [(a - b) / per_token for a, b in zip(windows, base)]
            se, batch = standard_errors(d, args.block)
            ratios.append({"source": source, "heads": heads, "change": math.expm1(statistics.mean(d)),
                           "se": se, "batch_means_se": batch, "ratio": batch / se})
        mean_square = sum(r["ratio"] ** 2 for r in ratios) / len(ratios)
        out.append({"store": str(store), "windows": len(base), "masks": len(ratios),
                    "ratio_mean_square": mean_square, "masks_detail": ratios})
        print(f"{store.parent.name}: {len(ratios)} confirmed masks, {len(base)} windows; batch-means / independent "
              f"se, mean square {mean_square:.2f}; AP's: " + ", ".join(
                  f"{r['heads']} heads {r['ratio']:.2f}" for r in ratios if r["source"] == "confirm:ap"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "window_correlation.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'window_correlation.json'}")


if __name__ == "__main__":
    main()
