"""Which axes `--guard auto` guards on the default model: each other axis's unrepaired bias against its noise floor.

For every HolisticBias axis but the repaired one (gender_and_sex), the unrepaired model's
likelihood bias on the confirmation half of validation (seed 0, a development seed; the
repair's ``confirm_prompts``), with its noise floor (bucket labels permuted within
templates). ``--guard auto`` leaves out an axis whose bias is within the floor's 95th
percentile. Also the seconds of the first evaluation of each axis (unrepaired: it builds
the axis's caches) and of a 3-head mask from layer 4 on. Validation data only.

    .venv/bin/python benchmarks/guard_axes.py

Writes ``benchmarks/results/guard_axes.json``.
"""

from __future__ import annotations

import tempfile
import time

from attnprune import HeadMask, load_model
from attnprune.config import RepairConfig
from attnprune.data import holisticbias as hb
from attnprune.run import Run
from common import write


def main() -> None:
    lm = load_model("smollm2-135m")
    base = HeadMask.all_active(*lm.layout.shape)
    mask = HeadMask.from_pruned(*lm.layout.shape, [(4, 1), (10, 2), (19, 1)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="guard_axes-") as tmp:
        cfg = RepairConfig(out=tmp)
        with Run.open(cfg, loaded=lm, log=lambda s: None) as run:
            for axis in hb.axes():
                if axis == cfg.axis:
                    continue
                ev, _ = run.evaluator(run.guard_spec(axis), with_perplexity=False)
                t = time.perf_counter()
                out = ev.evaluate(base, with_perplexity=False)[0]
                t0 = time.perf_counter() - t
                t = time.perf_counter()
                ev.evaluate(mask, with_perplexity=False)
                t1 = time.perf_counter() - t
                nf = out.bias_result.noise_floor
                row = {"axis": axis, "prompts": ev.bias_measure.describe().get("prompts"), "bias": out.bias,
                       "floor_mean": nf["mean"], "floor_p95": nf["p95"], "guarded_by_auto": out.bias > nf["p95"],
                       "seconds_unrepaired_first": t0, "seconds_3_head_mask": t1}
                rows.append(row)
                print(f"{axis}: {row['prompts']} prompts, bias {out.bias:.3f}, floor p95 {nf['p95']:.3f} -> "
                      f"{'guarded' if row['guarded_by_auto'] else 'left out'}; {t0:.0f} s / {t1:.0f} s", flush=True)
    write("guard_axes", {"setup": {"model": "smollm2-135m", "split": "valid", "part": "confirm", "seed": 0,
                                   "confirm_prompts": RepairConfig().confirm_prompts}, "rows": rows})


if __name__ == "__main__":
    main()
