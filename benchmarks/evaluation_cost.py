"""Cost of one mask evaluation on the default model (CPU) and what CI width it buys.

1. Seconds per evaluation at the repair's default sizes: likelihood bias (160 validation
   prompts) + perplexity (1,024 tokens).
2. Likelihood bias, its 95% CI width and noise floor against the number of prompts.
3. Toxicity bias (hatesonar) CI width against the number of prompts.
4. The held-out benchmarks a repair adds on the test split (CrowS-Pairs and StereoSet,
   gender): seconds per mask, unrepaired and a 3-head mask (layer reuse applies), and
   their CI widths.

Writes benchmarks/results/evaluation_cost.json.

    .venv/bin/python benchmarks/evaluation_cost.py
"""

from __future__ import annotations

import time

from attnprune import HeadMask, load_model
from attnprune.backend import Backend
from attnprune.measures import get_measure
from common import write


def timed(measure, mask):
    t = time.perf_counter()
    out = measure.score([mask])[0]
    return out, time.perf_counter() - t


def main() -> None:
    lm = load_model("smollm2-135m")
    base = HeadMask.all_active(*lm.layout.shape)
    backend = Backend(lm)
    res: dict = {"setup": {"model": "smollm2-135m", "split": "valid", "seed": 0, "dtype": "float32"}}

    lik = get_measure("likelihood", prompts=160).prepare(backend)
    ppl = get_measure("perplexity", max_tokens=1024).prepare(backend)
    timed(lik, base)  # warm-up
    _, t_lik = timed(lik, base)
    _, t_ppl = timed(ppl, base)
    res["default_evaluation_s"] = {"likelihood_160_prompts": t_lik, "perplexity_1024_tokens": t_ppl,
                                   "total": t_lik + t_ppl, "likelihood_prompts": len(lik.prompts_),
                                   "likelihood_tokens": lik.rows_.tokens, "perplexity": ppl.describe()}
    print(f"default evaluation: likelihood {t_lik:.2f} s ({len(lik.prompts_)} prompts, {lik.rows_.tokens} tokens) + "
          f"perplexity {t_ppl:.2f} s ({ppl.describe()['tokens_scored']} tokens) = {t_lik + t_ppl:.2f} s")

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
