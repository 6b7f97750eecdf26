"""Cost of one mask evaluation on the default model (CPU) and what CI width it buys.

1. Seconds per evaluation at the repair's default sizes (read from ``RepairConfig``), for
   each of its three evaluators: search (the search half of the validation prompts and
   text), confirmation (the other half) and test; for a single-head knockout in a middle
   layer (layer reuse skips the layers below it) and a 3-head mask from layer 4 on.
2. Likelihood bias, its 95% CI width and noise floor against the number of prompts.
3. Toxicity bias (hatesonar) CI width against the number of prompts.
4. The held-out benchmarks a repair adds on the test split (CrowS-Pairs and StereoSet,
   gender): seconds per mask, unrepaired and a 3-head mask (layer reuse applies), and
   their CI widths.

Writes benchmarks/results/evaluation_cost.json.

    .venv/bin/python benchmarks/evaluation_cost.py
"""

from __future__ import annotations

import tempfile
import time

from attnprune import HeadMask, load_model
from attnprune.backend import Backend
from attnprune.config import RepairConfig
from attnprune.measures import get_measure
from attnprune.run import Run
from common import write


def timed(measure, mask):
    t = time.perf_counter()
    out = measure.score([mask])[0]
    return out, time.perf_counter() - t


def repair_evaluations(lm) -> dict:
    """Seconds per mask of the repair's search, confirmation and test evaluators at their default sizes."""
    shape = lm.layout.shape
    masks = {f"knockout_layer_{shape[0] // 2}": HeadMask.from_pruned(*shape, [(shape[0] // 2, 0)]),
             "3_heads_from_layer_4": HeadMask.from_pruned(*shape, [(4, 1), (10, 2), (19, 1)])}
    out = {}
    with tempfile.TemporaryDirectory(prefix="evaluation_cost-") as tmp, \
            Run.open(RepairConfig(out=tmp), loaded=lm, log=lambda s: None) as run:
        cfg = run.cfg
        specs = {"search": run.valid_spec, "confirmation": run.confirm_spec,
                 "test": run.spec("test", prompts=cfg.test_prompts, ppl_tokens=cfg.test_ppl_tokens)}
        for name, spec in specs.items():
            ev, _ = run.evaluator(spec)
            ev.evaluate(HeadMask.all_active(*shape))  # warm-up: builds the caches of the unrepaired model
            row = {"bias_inputs": ev.bias_measure.describe(), "perplexity_inputs": ev.ppl_measure.describe()}
            for label, mask in masks.items():
                t = time.perf_counter()
                ev.evaluate(mask)
                row[f"seconds_{label}"] = time.perf_counter() - t
            out[name] = row
            print(f"{name}: {row['bias_inputs'].get('prompts')} prompts, "
                  f"{row['perplexity_inputs'].get('tokens_scored')} perplexity tokens: "
                  + ", ".join(f"{label} {row[f'seconds_{label}']:.1f} s" for label in masks))
    return out


def main() -> None:
    lm = load_model("smollm2-135m")
    base = HeadMask.all_active(*lm.layout.shape)
    backend = Backend(lm)
    res: dict = {"setup": {"model": "smollm2-135m", "split": "valid", "seed": 0, "dtype": "float32"}}

    res["repair_evaluations_s"] = repair_evaluations(lm)

    rows = []
    for n in (40, 80, 160, 320, 640):
        m = get_measure("likelihood", prompts=n).prepare(backend)
        out, t = timed(m, base)
        rows.append({"prompts": len(m.prompts_), "bias": out["bias"], "ci": out["ci"], "ci_width": out["ci"][1] - out["ci"][0],
                     "noise_floor": out["noise_floor"]["mean"], "seconds": t})
        print(f"likelihood, {len(m.prompts_):5d} prompts: bias {out['bias']:.3f} CI width {rows[-1]['ci_width']:.3f} "
              f"noise floor {out['noise_floor']['mean']:.3f}  {t:.1f} s")
    res["likelihood_vs_prompts"] = rows

    rows = []
    for n in (64, 128):
        m = get_measure("toxicity", prompts=n, classifier="hatesonar").prepare(backend)
        out, t = timed(m, base)
        rows.append({"prompts": len(m.prompts_), "bias": out["bias"], "ci": out["ci"], "ci_width": out["ci"][1] - out["ci"][0],
                     "noise_floor": out["noise_floor"]["mean"], "mean_toxicity": out["mean_toxicity"], "seconds": t})
        print(f"toxicity (hatesonar), {len(m.prompts_):4d} prompts: bias {out['bias']:.4f} CI width "
              f"{rows[-1]['ci_width']:.4f} noise floor {out['noise_floor']['mean']:.4f}  {t:.1f} s")
    res["toxicity_vs_prompts"] = rows

    rows = []
    mask = HeadMask.from_pruned(*lm.layout.shape, [(4, 1), (10, 2), (19, 1)])
    for name in ("crows_pairs", "stereoset"):
        m = get_measure(name, split="test").prepare(backend)
        timed(m, base)  # warm-up: builds the layer cache
        out, t_base = timed(m, base)
        _, t_mask = timed(m, mask)
        stats = {k: {"value": v["value"], "ci_width": v["ci"][1] - v["ci"][0]} for k, v in out["statistics"].items()}
        rows.append({"measure": name, **m.describe(), "seconds_unrepaired": t_base, "seconds_3_head_mask": t_mask,
                     "tokens": m.rows_.tokens, "statistics": stats})
        print(f"{name}: {m.rows_.tokens} tokens, {t_base:.1f} s unrepaired, {t_mask:.1f} s with a 3-head mask; "
              + ", ".join(f"{k} {v['value']:.1f} (CI width {v['ci_width']:.1f})" for k, v in stats.items()))
    res["held_out_benchmarks"] = rows
    write("evaluation_cost", res)


if __name__ == "__main__":
    main()
