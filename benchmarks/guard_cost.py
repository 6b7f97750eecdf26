"""What the no-harm guards cost a repair on the default model, and how precise they are.

For each kind of guard (``--guard``): another HolisticBias axis (the search's likelihood
measure on the confirmation half of validation, at the repair's ``confirm_prompts``) and
``lms`` (StereoSet on the validation items of every bias type), on smollm2-135m at the
repair's default sizes (read from ``RepairConfig``):

- seconds per mask, for the unrepaired model (after a warm-up that builds the caches) and
  for a 3-head mask from layer 4 on (layer reuse skips the layers below it);
- the guarded value of the unrepaired model (a bias, or 100 - LMS), its 95% CI, and the
  margin the default ``--guard-margin`` allows;
- the guard's one-sided bound minus the point change for that 3-head mask (how much the
  bound adds at the default ``--confidence``), from :meth:`attnprune.run.Run.guard`.

A repair measures a guard for the unrepaired model and for each confirmed candidate that
passes the budget and lowers the bias (at most ``--confirm``): the script prints that
upper bound on a guard's cost. Validation data only; nothing here reads a test split.

    .venv/bin/python benchmarks/guard_cost.py

Writes ``benchmarks/results/guard_cost.json``.
"""

from __future__ import annotations

import tempfile
import time

from attnprune import HeadMask, load_model
from attnprune.config import RepairConfig
from attnprune.run import Run
from common import write

GUARDS = ("race_ethnicity", "religion", "lms")


def main() -> None:
    lm = load_model("smollm2-135m")
    shape = lm.layout.shape
    base = HeadMask.all_active(*shape)
    mask = HeadMask.from_pruned(*shape, [(4, 1), (10, 2), (19, 1)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="guard_cost-") as tmp:
        cfg = RepairConfig(out=tmp, guard=",".join(GUARDS))
        with Run.open(cfg, loaded=lm, log=lambda s: None) as run:
            for name in GUARDS:
                ev, _ = run.evaluator(run.guard_spec(name), with_perplexity=False)
                ev.evaluate(base, with_perplexity=False)  # warm-up: the unrepaired model's caches
                seconds = {}
                for label, m in (("unrepaired", base), ("3_heads_from_layer_4", mask)):
                    t = time.perf_counter()
                    out = ev.evaluate(m, with_perplexity=False)[0]
                    seconds[label] = time.perf_counter() - t
                    if label == "unrepaired":
                        unrepaired = out
                verdict = run.guard([mask])[0][name]  # the repair's own verdict (every guard of cfg, stored once)
                stats = unrepaired.bias_result.statistics
                value = 100 - stats["lms"]["value"] if name == "lms" else unrepaired.bias
                ci = ([100 - stats["lms"]["ci"][1], 100 - stats["lms"]["ci"][0]] if name == "lms"
                      else list(unrepaired.bias_ci))
                row = {"guard": name, "inputs": ev.bias_measure.describe(), "seconds_per_mask": seconds,
                       "unrepaired_value": value, "unrepaired_ci": ci, "limit": cfg.guard_margin * value,
                       "bound_minus_change_3_head_mask": verdict.upper - verdict.change,
                       "change_3_head_mask": verdict.change,
                       "most_seconds_per_repair": (cfg.confirm + 1) * seconds["3_heads_from_layer_4"]}
                rows.append(row)
                size = row["inputs"].get("prompts", row["inputs"].get("items"))
                print(f"{name}: {size} {'items' if name == 'lms' else 'prompts'}, "
                      f"{seconds['unrepaired']:.1f} s unrepaired / {seconds['3_heads_from_layer_4']:.1f} s 3-head mask;"
                      f" value {value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}], limit +{row['limit']:.3f}, the bound adds "
                      f"{row['bound_minus_change_3_head_mask']:+.3f}; at most {row['most_seconds_per_repair']:.0f} s "
                      f"per repair ({cfg.confirm} candidates + the unrepaired model)")
    write("guard_cost", {"setup": {"model": "smollm2-135m", "split": "valid", "seed": 0,
                                   "confirm": RepairConfig().confirm, "guard_margin": RepairConfig().guard_margin,
                                   "confidence": RepairConfig().confidence},
                         "rows": rows})


if __name__ == "__main__":
    main()
