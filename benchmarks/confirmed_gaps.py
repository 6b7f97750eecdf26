"""How far every confirmed mask's perplexity change on the confirmation text strays from its search-text change, by
what proposed the mask.

Reads a finished run's store (validation data only; nothing is evaluated): each mask any method confirmed, its change
on the search's perplexity windows and on the confirmation windows, and the gap (confirmation minus search, on the
log scale) per pruned head, grouped into the search's own candidates (AP's and ap_paper's annealing), the design's
masks (knockouts and random samples) and the baselines' masks. A gap the search's candidates show and the design's
masks do not is selection: the search picked heads whose removal is cheap on the text it measures. On an evaluation
seed's store this is validation data read after the seed ran: a change it motivates is not evidenced by that seed.

    .venv/bin/python benchmarks/confirmed_gaps.py /work/evalruns/seed-30/seed-30/store.sqlite

Writes ``benchmarks/results/confirmed_gaps-seedN.json``.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from attnprune import labels
from attnprune.selection import window_differences
from attnprune.store import Store
from common import write

GROUPS = ("search candidates", "design (knockouts, samples)", "baselines")


def group_of(names: set[str]) -> str:
    """Which of :data:`GROUPS` proposed a mask with these store labels (the search's own, when it is among them)."""
    if any(labels.is_candidate(n) for n in names):
        return GROUPS[0]
    if any(not n.startswith("method:") for n in names):
        return GROUPS[1]
    return GROUPS[2]


def gaps(path: Path) -> dict:
    store = Store(path, None)
    search = store.setting_of(labels.KNOCKOUT) or store.setting_of("sample")
    named = defaultdict(set)  # mask key -> labels under the search setting
    for key, label in store.db.execute("SELECT mask_key, label FROM labels WHERE setting=?", (search,)):
        named[key].add(label)
    searched = {r.mask.key: r for r in store.evaluations(search)}
    confirm_settings = {s for (s,) in store.db.execute(
        "SELECT DISTINCT setting FROM evaluations WHERE source LIKE 'confirm:%'")}
    confirmed = {}
    for s in confirm_settings:
        for r in store.evaluations(s):
            confirmed.setdefault(r.mask.key, r)
    base_key = next(k for k, r in confirmed.items() if r.mask.n_pruned == 0)
    base_s, base_c = searched[base_key], confirmed[base_key]
    rows = []
    for key, c in confirmed.items():
        if key == base_key or key not in searched:
            continue
        s = searched[key]
        search_change, confirm_change = s.perplexity / base_s.perplexity - 1, c.perplexity / base_c.perplexity - 1
        rows.append({"heads": c.mask.n_pruned, "group": group_of(named[key]), "labels": sorted(named[key]),
                     "search": search_change, "confirmation": confirm_change,
                     "gap": math.log1p(confirm_change) - math.log1p(search_change),
                     "confirmation_window_sd": float(np.std(window_differences(c, base_c), ddof=1))})
    rows.sort(key=lambda r: (GROUPS.index(r["group"]), r["heads"]))
    summary = {}
    for g in GROUPS:
        mine = [r for r in rows if r["group"] == g]
        if mine:
            summary[g] = {"masks": len(mine), "mean_gap": float(np.mean([r["gap"] for r in mine])),
                          "gap_per_head": float(sum(r["gap"] for r in mine) / sum(r["heads"] for r in mine)),
                          "mean_heads": float(np.mean([r["heads"] for r in mine]))}
    config = store.config
    store.close()
    return {"store": str(path), "seed": config.get("seed"), "rows": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, help="a run's store.sqlite")
    a = ap.parse_args()
    out = gaps(a.store)
    for r in out["rows"]:
        print(f"{r['heads']:3d} heads  {r['group']:28s} search {100 * r['search']:+6.2f}%  confirmation "
              f"{100 * r['confirmation']:+6.2f}%  gap {100 * r['gap']:+5.2f}  window sd "
              f"{100 * r['confirmation_window_sd']:4.1f}  {','.join(r['labels'])}")
    for g, s in out["summary"].items():
        print(f"{g}: {s['masks']} masks, {s['mean_heads']:.1f} heads on average, mean gap {100 * s['mean_gap']:+.2f}, "
              f"{100 * s['gap_per_head']:+.3f} per pruned head")
    write(f"confirmed_gaps-seed{out['seed']}", out)


if __name__ == "__main__":
    main()
