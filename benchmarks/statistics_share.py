"""Share of one evaluation's seconds spent on its bias statistics (bootstrap CI, noise floor, corrected spread).

Every evaluation summarises its per-prompt scores: a template-adjusted bootstrap of the bias,
the noise floor from shuffled bucket labels, and Lum et al.'s corrected spread. For each
evaluator of the default repair (search and confirmation, read from ``RepairConfig`` as a run
builds them; ``--test`` adds the test evaluator, whose warm-up on 10,710 prompts takes
minutes), on the default model, this times side by side in one run the model's part of one
evaluation (likelihood scores and perplexity, each timed, of a single-head knockout in the middle
layer) and the statistics of those scores, best of three. The perplexity's share is what a
knockout without perplexity would save.

It was written to decide whether caching the statistics' resamples per evaluator pays: a
measurement beside a busy process put them at seconds per evaluation; on idle cores they are
a few hundredths of a second (fourteenth session), so the cache was not kept.

    .venv/bin/python benchmarks/statistics_share.py [--test]

Writes ``benchmarks/results/statistics_share.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from attnprune import HeadMask, load_model
from attnprune.config import RepairConfig
from attnprune.run import Run
from common import write


def main(repeats: int = 3, test: bool = False) -> None:
    lm = load_model("smollm2-135m")
    shape = lm.layout.shape
    mask = HeadMask.from_pruned(*shape, [(shape[0] // 2, 0)])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="statistics_share-") as tmp, \
            Run.open(RepairConfig(out=tmp), loaded=lm, log=lambda s: None) as run:
        cfg = run.cfg
        specs = {"search": run.valid_spec, "confirmation": run.confirm_spec}
        if test:
            specs["test"] = run.spec("test", prompts=cfg.test_prompts, ppl_tokens=cfg.test_ppl_tokens)
        for name, spec in specs.items():
            ev, _ = run.evaluator(spec)
            ev.evaluate(HeadMask.all_active(*shape))  # warm-up: the unrepaired model's layer caches
            measure = ev.bias_measure
            bias_s, ppl_s, statistics = [], [], []
            for _ in range(repeats):
                t = time.perf_counter()
                scores = measure.prompt_scores([mask])[0]
                bias_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                ev.ppl_measure.score([mask])
                ppl_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                measure.summarize(scores)
                statistics.append(time.perf_counter() - t)
            b, lp, s = min(bias_s), min(ppl_s), min(statistics)
            m = b + lp
            rows[name] = {"prompts": len(measure.prompts_), "perplexity_tokens": ev.ppl_measure.tokens_scored,
                          "bootstrap_reps": measure.bootstrap_reps, "model_s": m, "bias_model_s": b,
                          "perplexity_s": lp, "statistics_s": s, "statistics_share": s / (m + s),
                          "perplexity_share": lp / (m + s)}
            print(f"{name:12s} {len(measure.prompts_):6,d} prompts, {ev.ppl_measure.tokens_scored:6,d} tokens, "
                  f"{measure.bootstrap_reps} resamples: model {m:6.2f} s (bias scores {b:5.2f} s, perplexity "
                  f"{lp:5.2f} s = {100 * lp / (m + s):.0f}%), statistics {s:5.3f} s ({100 * s / (m + s):.1f}% of the "
                  "evaluation)")
    write("statistics_share", {"model": "smollm2-135m", "mask": f"single-head knockout, layer {shape[0] // 2}",
                               "seed": RepairConfig().seed, "best_of": repeats, "evaluators": rows})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--test", action="store_true", help="time the test evaluator too (minutes of warm-up)")
    main(test=parser.parse_args().test)
