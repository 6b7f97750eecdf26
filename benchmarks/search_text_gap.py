"""Is the gap between the search's perplexity text and the confirmation text selection, or the texts themselves?

Random masks of a finished run's screened heads (its single-head knockouts), chosen by no search, measured on the
search's perplexity windows and on the confirmation windows (validation data only; development seeds only). A
search's candidates that show a gap random masks do not show were chosen for being cheap on the search text.

    .venv/bin/python benchmarks/search_text_gap.py runs/dev-seed1 [--sizes 8,12,15,15,20,20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import DEVELOPMENT_SEEDS, write  # noqa: E402


def main() -> None:
    from attnprune.backend import Backend
    from attnprune.heads import HeadMask
    from attnprune.measures.perplexity import PerplexityBenchmark
    from attnprune.models.loading import load_model
    from attnprune.store import Store

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a repair's output directory (a development seed's)")
    ap.add_argument("--sizes", default="8,12,15,15,20,20", help="pruned heads of each random mask")
    ap.add_argument("--seed", type=int, default=7, help="seed of the random masks")
    a = ap.parse_args()
    report = json.loads((Path(a.run) / "report.json").read_text())
    cfg = report["config"]
    if cfg["seed"] not in DEVELOPMENT_SEEDS:
        sys.exit(f"{a.run} is seed {cfg['seed']}, an evaluation seed; this study reads development seeds only.")
    store = Store(Path(a.run) / "store.sqlite", None)
    knocked = [tuple(r.mask.pruned[0]) for r in store.evaluations(store.setting_of("sample")) if r.mask.n_pruned == 1]
    loaded = load_model(cfg["model"])
    backend = Backend(loaded)
    texts = {part: PerplexityBenchmark(split="valid", source=cfg["corpus"], max_tokens=tokens, part=part,
                                       seed=cfg["seed"]).prepare(backend)
             for part, tokens in (("search", cfg["ppl_tokens"]), ("confirm", cfg["confirm_ppl_tokens"]))}
    rng = np.random.default_rng(a.seed)
    shape = loaded.layout.shape
    masks = [HeadMask.all_active(*shape)] + [
        HeadMask.from_pruned(*shape, [knocked[i] for i in rng.choice(len(knocked), int(k), replace=False)])
        for k in a.sizes.split(",")]
    scores = {part: text.score(masks) for part, text in texts.items()}
    rows = []
    for i, m in enumerate(masks[1:], 1):
        change = {part: s[i]["perplexity"] / s[0]["perplexity"] - 1 for part, s in scores.items()}
        rows.append({"heads": m.n_pruned, "pruned": [list(p) for p in m.pruned], **change})
        print(f"{m.n_pruned:2d} heads: search text {100 * change['search']:+.2f}%, confirmation text "
              f"{100 * change['confirm']:+.2f}%")
    gap = float(np.mean([np.log1p(r["confirm"]) - np.log1p(r["search"]) for r in rows]))
    print(f"mean gap (confirmation - search, log scale): {100 * gap:+.2f} points")
    write(f"search_text_gap-seed{cfg['seed']}", {"run": a.run, "seed": cfg["seed"], "masks": rows, "mean_gap": gap,
                                                 "windows": {p: len(t.windows_) for p, t in texts.items()}})


if __name__ == "__main__":
    main()
