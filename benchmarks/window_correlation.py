"""Are the perplexity windows of a confirmation independent, as the choice's bound assumes?

Report only: it reads the validation confirmations already in evaluation seeds' stores (nothing is
evaluated, nothing is chosen). For every confirmed mask, the per-window change in mean token NLL
from the unrepaired model (the differences :func:`attnprune.selection.window_differences` bounds)
gives two standard errors of the mean change: the independent-window one the bound uses, and a
batch-means one over consecutive blocks of ``--block`` windows, which grows when neighbouring
windows move together. Their ratio near 1 (mean square over a seed's masks) says the bound's
noise model holds; AP's own confirmed masks are listed with theirs.

    .venv/bin/python benchmarks/window_correlation.py --stores /work/evalruns/seed-34,/work/evalruns/seed-37

(a comparison's run directory: its ``seed-N/store.sqlite`` is read; nothing is added).
Writes ``benchmarks/results/window_correlation.json``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from attnprune.selection import window_differences
from attnprune.store import Store, StoredEvaluation
from common import write


def confirmations(store: Store) -> tuple[StoredEvaluation, list[StoredEvaluation]]:
    """(the unrepaired model's confirmation, every confirmed mask's, once each) among the rows with perplexity windows.

    A mask confirmed for perplexity first and then for bias is stored under both confirmation
    settings with the same windows: it counts once.
    """
    rows: dict[str, StoredEvaluation] = {}
    for setting in sorted({s for s, _ in store.pairs()}):
        for r in store.evaluations(setting):
            if r.split == "confirm" and r.perplexity_result is not None and r.perplexity_result.per_window:
                rows.setdefault(r.mask.key, r)
    base = next(r for r in rows.values() if r.mask.n_pruned == 0)
    return base, [r for r in rows.values() if r.mask.n_pruned > 0]


def standard_errors(d: np.ndarray, block: int) -> tuple[float, float]:
    """(independent-window, batch-means) standard error of the mean of ``d``."""
    means = [d[i:i + block].mean() for i in range(0, len(d) - block + 1, block)]
    return float(d.std(ddof=1) / math.sqrt(len(d))), float(np.std(means, ddof=1) / math.sqrt(len(means)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", required=True, help="comma-separated comparison run directories (one seed each)")
    ap.add_argument("--block", type=int, default=4, help="windows per batch mean")
    args = ap.parse_args()
    out = []
    for run_dir in map(Path, args.stores.split(",")):
        (path,) = run_dir.glob("seed-*/store.sqlite")
        store = Store(path, None)
        base, masks = confirmations(store)
        store.close()
        ratios = []
        for row in masks:
            d = window_differences(row, base)
            se, batch = standard_errors(d, args.block)
            ratios.append({"source": row.source, "heads": row.mask.n_pruned, "change": math.expm1(float(d.mean())),
                           "se": se, "batch_means_se": batch, "ratio": batch / se})
        windows = len(base.perplexity_result.per_window)
        mean_square = sum(r["ratio"] ** 2 for r in ratios) / len(ratios)
        out.append({"store": str(path), "windows": windows, "masks": len(ratios),
                    "ratio_mean_square": mean_square, "masks_detail": ratios})
        print(f"{path.parent.name}: {len(ratios)} confirmed masks, {windows} windows; batch-means / independent "
              f"se, mean square {mean_square:.2f}; AP's: " + ", ".join(
                  f"{r['heads']} heads {r['ratio']:.2f}" for r in ratios if r["source"] == "confirm:ap"))
    write("window_correlation", {"split": "valid (confirmations of evaluation seeds, read back)", "block": args.block,
                                 "stores": out})


if __name__ == "__main__":
    main()
