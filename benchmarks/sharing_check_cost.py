"""What the shared-prefix check costs on a large input set: every prompt vs a probe, in one run.

The likelihood measure computes each HolisticBias template's common token prefix once per
mask (the backend's shared prefixes). Whether that reproduces whole prompts is checked once
per input set on the unrepaired model. Until this benchmark's commit the check ran a whole
pass over every prompt of the set, which on a repair's 10,000-prompt test split cost more
than a masked evaluation. Now it runs on a probe (each prefix with its shortest, median and
longest suffix).

On the default model and the whole validation split of gender_and_sex (seed 1, a
development seed; about as many prompts as a repair's test), this prints, side by side:

- ``whole``: the old check's extra cost, one pass over every prompt as whole sequences;
- ``probe``: the new check;
- ``evaluate``: what both paths then spend to score the unrepaired model and a 16-head mask
  (building the layer cache included);

and the first-use ratio (whole + evaluate) / (probe + evaluate). The decision and the
scores are the same either way (checked). Writes ``benchmarks/results/sharing_check_cost.json``.

    .venv/bin/python benchmarks/sharing_check_cost.py
"""

from __future__ import annotations

import time

import numpy as np

from attnprune import HeadMask, load_model
from attnprune.backend import Backend
from attnprune.measures import get_measure
from common import write

PRUNED = [(2, 1), (4, 0), (5, 7), (7, 3), (9, 2), (11, 5), (12, 8), (14, 1), (16, 6), (18, 0), (20, 4), (22, 2),
          (24, 7), (26, 3), (27, 5), (29, 1)]  # 16 heads spread over the layers, as a repair prunes them


def main() -> None:
    lm = load_model("smollm2-135m")
    shape = lm.layout.shape
    base, mask = HeadMask.all_active(*shape), HeadMask.from_pruned(*shape, PRUNED)
    backend = Backend(lm)
    measure = get_measure("likelihood", split="valid", seed=1, prompts=100_000).prepare(backend)
    rows = measure.rows_
    print(f"{rows.n} prompts, {rows.tokens} tokens ({rows.split.tokens} with shared prefixes); "
          f"probe {rows.probe().n} prompts")

    t = time.perf_counter()
    whole = backend._whole_last(rows, [base], measure._log_odds, None, measure.batch_size)
    t_whole = time.perf_counter() - t

    t = time.perf_counter()
    backend._decide_sharing(rows, measure._log_odds, measure.batch_size)
    t_probe = time.perf_counter() - t
    assert rows.sharing, "the default model shares prefixes exactly"

    t = time.perf_counter()
    scores = measure.prompt_scores([base, mask])
    t_eval = time.perf_counter() - t
    worst = float(np.abs(scores[0] - whole[0]).max())
    assert worst < 1e-4 * max(1.0, float(np.abs(whole).max())), worst

    old, new = t_whole + t_eval, t_probe + t_eval
    print(f"check on every prompt (one whole pass) {t_whole:.1f} s, on the probe {t_probe:.1f} s; "
          f"then unrepaired + 16-head mask {t_eval:.1f} s")
    print(f"first use of the input set: {old:.1f} s -> {new:.1f} s ({old / new:.2f}x); "
          f"largest score difference shared vs whole {worst:.1e}")
    write("sharing_check_cost", {
        "setup": {"model": "smollm2-135m", "measure": "likelihood", "axis": "gender_and_sex", "split": "valid",
                  "seed": 1, "prompts": rows.n, "tokens": rows.tokens, "shared_tokens": rows.split.tokens,
                  "probe_prompts": rows.probe().n, "mask_heads": len(PRUNED)},
        "seconds": {"check_every_prompt": t_whole, "check_probe": t_probe, "evaluate_two_masks": t_eval},
        "first_use_ratio": old / new, "max_abs_difference_shared_vs_whole": worst,
    })


if __name__ == "__main__":
    main()
