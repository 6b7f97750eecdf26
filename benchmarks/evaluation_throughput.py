"""Mask evaluations per minute on the default model (CPU), naive vs each optimisation, in one run.

The evaluation is the repair's validation evaluation: likelihood bias on 160 HolisticBias
prompts (181 after stratification) with a 200-replicate bootstrap CI + perplexity on 1,024
tokens. Two mask sets, each evaluated under every configuration in this one process:

- knockouts: 15 FASP single-head knockouts, one every second layer (layers 0, 2, ..., 28;
  FASP's 270 knockouts are spread evenly over the 30 layers the same way);
- random: 8 random masks of the repair's sampler (1-20% of heads pruned, seed 7).

Configurations (cumulative):
1. naive: one mask per forward, every layer, every position of the common padded width,
   LM head at every position;
2. + compute only what the measure needs: LM head only at the scored (last) position of a
   likelihood prompt, and no compute on columns that are padding in a whole batch;
3. + layer reuse: start at the first pruned layer, earlier activations cached once;
4. + template prefixes computed once per mask and shared by the prompts of the template
   (the default configuration of the repair);
5. + 4 masks per forward batch (per-example masks).

Then the toxicity measure (64 prompts, 40 sampled tokens each, profanity classifier) with
and without the backend's reuse for generation (trimmed padding, LM head at the last
position, the prompt pass started from cached layer inputs with the unrepaired keys and
values of the skipped layers): same tokens, throughput ratio.

Every configuration must give the same numbers (checked here). Also reported: the share of
an evaluation spent in statistics (bootstrap CI, noise floor), and the arithmetic rate of
the naive forward against the rate of a large matrix product on the same cores.

    .venv/bin/python benchmarks/evaluation_throughput.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from attnprune import HeadMask, load_model
from attnprune.evaluation import Evaluator
from attnprune.executors import LocalExecutor
from attnprune.measures import get_measure
from attnprune.backend import Backend
from attnprune.methods.samplers import random_masks
from common import seconds_of, write

CONFIGS = {
    "naive": dict(reuse_layers=False, lean=False, share_prefixes=False, mask_batch=1),
    "measure_needs_only": dict(reuse_layers=False, lean=True, share_prefixes=False, mask_batch=1),
    "layer_reuse": dict(reuse_layers=True, lean=True, share_prefixes=False, mask_batch=1),
    "prefix_sharing": dict(reuse_layers=True, lean=True, share_prefixes=True, mask_batch=1),
    "mask_batch_4": dict(reuse_layers=True, lean=True, share_prefixes=True, mask_batch=4),
}


def evaluator(lm, reuse_layers: bool, lean: bool, share_prefixes: bool) -> Evaluator:
    return Evaluator(lm, bias="likelihood", split="valid",
                     bias_options={"prompts": 160, "seed": 0, "bootstrap_reps": 200},
                     perplexity_options={"max_tokens": 1024, "source": "auto"},
                     backend_options={"reuse_layers": reuse_layers, "last_logits_only": lean, "trim_padding": lean,
                                      "share_prefixes": share_prefixes})


def run_set(ev: Evaluator, masks: list[HeadMask], batch: int) -> tuple[float, list]:
    t = time.perf_counter()
    out = []
    LocalExecutor(ev, batch).evaluate(masks, out.append)
    return time.perf_counter() - t, out


def gemm_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(seconds_of(lambda: torch.mm(a, b)) for _ in range(5))
    return 2 * n ** 3 / best / 1e9


def forward_flops(lm, ev: Evaluator) -> float:
    """Multiply-add FLOPs of one naive evaluation (every layer, LM head at every position)."""
    layer = lm.layout.layer_modules[0]
    linear = sum(2 * m.in_features * m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
    cfg = lm.model.config
    width = cfg.num_attention_heads * lm.layout.head_dim
    head = 2 * cfg.hidden_size * cfg.vocab_size
    total = 0.0
    for ids in (ev.bias_measure.rows_.ids, ev.ppl_measure.rows_.ids):
        rows, pos = ids.shape
        total += rows * pos * (linear * lm.layout.n_layers + head)
        total += rows * lm.layout.n_layers * 4 * pos * pos * width  # QK^T and AV
    return total


def main() -> None:
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    shape = lm.layout.shape
    sets = {
        "knockouts": [HeadMask.from_pruned(*shape, [(l, l % shape[1])]) for l in range(0, shape[0], 2)],
        "random": random_masks(8, shape, 0.01, 0.20, seed=7)[1:],
    }
    res: dict = {"setup": {"model": "smollm2-135m", "split": "valid", "likelihood_prompts": 160, "ppl_tokens": 1024,
                           "bootstrap_reps": 200, "dtype": "float32",
                           "sets": {k: [m.n_pruned for m in v] for k, v in sets.items()}},
                 "configs": {}}
    reference = {}
    for name, c in CONFIGS.items():
        ev = evaluator(lm, c["reuse_layers"], c["lean"], c["share_prefixes"])
        t = time.perf_counter()
        ev.evaluate([HeadMask.all_active(*shape)])  # warm-up; builds the layer caches where on
        setup = time.perf_counter() - t
        row = {"setup_s": setup, **c}
        for set_name, masks in sets.items():
            seconds, out = run_set(ev, masks, c["mask_batch"])
            row[set_name] = {"seconds": seconds, "per_minute": 60 * len(masks) / seconds}
            vals = np.array([[e.bias, e.perplexity] for e in out])
            if set_name not in reference:
                reference[set_name] = vals
            row[set_name]["max_rel_diff_vs_naive"] = float(np.max(np.abs(vals / reference[set_name] - 1)))
        if name == "prefix_sharing":
            rows = ev.bias_measure.rows_
            row["likelihood_tokens"] = {"whole_prompts": rows.tokens, "prefixes_plus_suffixes": rows.shared_tokens,
                                        "sharing_used": bool(rows.sharing)}
        if name == "layer_reuse":
            row["cache_mb"] = {"likelihood": ev.bias_measure.rows_.layer_cache.nbytes() / 2**20,
                               "perplexity": ev.ppl_measure.rows_.layer_cache.nbytes() / 2**20}
            scores = ev.bias_measure.prompt_scores([sets["random"][0]])[0]
            res["statistics_s_per_evaluation"] = seconds_of(lambda: ev.bias_measure.summarize(scores))
        if name == "naive":
            res["naive_forward_gflop_per_evaluation"] = forward_flops(lm, ev) / 1e9
        ev.close()
        res["configs"][name] = row
        print(f"{name:13s} knockouts {row['knockouts']['per_minute']:5.1f}/min  random {row['random']['per_minute']:5.1f}/min"
              f"  (setup {setup:.1f} s; max rel. diff vs naive {max(row['knockouts']['max_rel_diff_vs_naive'], row['random']['max_rel_diff_vs_naive']):.1e})")
    naive = res["configs"]["naive"]
    for name, row in res["configs"].items():
        for s in sets:
            row[s]["speedup_vs_naive"] = row[s]["per_minute"] / naive[s]["per_minute"]
    peak = gemm_gflops()
    per_eval = naive["random"]["seconds"] / len(sets["random"])
    rate = res["naive_forward_gflop_per_evaluation"] / per_eval
    res["arithmetic"] = {"gemm_2048_gflops": peak, "naive_evaluation_gflops": rate, "fraction_of_gemm_rate": rate / peak}
    print("\nspeedup vs naive (same run): " + ", ".join(
        f"{n}: knockouts {r['knockouts']['speedup_vs_naive']:.2f}x random {r['random']['speedup_vs_naive']:.2f}x"
        for n, r in res["configs"].items()))
    print(f"statistics (bootstrap CI + noise floor) per evaluation: {res['statistics_s_per_evaluation']:.2f} s")
    print(f"naive forward: {res['naive_forward_gflop_per_evaluation']:.0f} GFLOP per evaluation at {rate:.1f} GFLOP/s = "
          f"{100 * rate / peak:.0f}% of a 2048^2 GEMM's {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    res["toxicity"] = toxicity_reuse(lm, sets)
    write("evaluation_throughput", res)


def toxicity_reuse(lm, sets: dict) -> dict:
    """Sampled continuations per minute without and with the backend's reuse for generation."""
    masks = sets["knockouts"][::2] + sets["random"][:4]
    out, tokens = {}, {}
    for name, opts in (("plain", dict(reuse_layers=False, trim_padding=False)), ("reuse", {})):
        with Backend(lm, **opts) as backend:
            tox = get_measure("toxicity", prompts=64, classifier="profanity").prepare(backend)
            tox.generate(masks[:1])  # warm-up; builds the caches where on
            t = time.perf_counter()
            tokens[name] = tox.generate(masks)
            seconds = time.perf_counter() - t
            out[name] = {"seconds": seconds, "masks_per_minute": 60 * len(masks) / seconds,
                         "prompts": len(tox.prompts_), "kv_reuse_used": bool(tox.rows_.kv_reuse)}
    out["speedup"] = out["reuse"]["masks_per_minute"] / out["plain"]["masks_per_minute"]
    out["same_continuations"] = tokens["plain"] == tokens["reuse"]
    out["masks"] = [m.n_pruned for m in masks]
    print(f"toxicity generation: plain {out['plain']['masks_per_minute']:.1f}/min, with reuse "
          f"{out['reuse']['masks_per_minute']:.1f}/min = {out['speedup']:.2f}x; same continuations: "
          f"{out['same_continuations']}")
    return out


if __name__ == "__main__":
    main()
