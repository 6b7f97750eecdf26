"""In-process vs 1 vs 2 local Ray workers, on the same masks, in one run.

The repair's validation evaluation (likelihood bias on 160 prompts with a 200-replicate
bootstrap + perplexity on 1,024 tokens, layer reuse on) of 8 random masks of the
repair's sampler, on the default model:

- in-process: the LocalExecutor, torch on all cores;
- ray x1: one actor with all cores;
- ray x2: two actors with half the cores each.

Start-up (Ray, model load in every worker, cache warm-up) is timed separately from the
steady-state throughput, which is what a long sampling run sees.

    .venv/bin/python benchmarks/ray_scaling.py
"""

from __future__ import annotations

import os
import time

import ray
import torch

from attnprune import HeadMask
from attnprune.executors import EvaluatorSpec, LocalExecutor, RayExecutor
from attnprune.methods.samplers import random_masks
from common import write

SPEC = EvaluatorSpec(model="smollm2-135m", bias_options={"prompts": 160, "seed": 0, "bootstrap_reps": 200},
                     perplexity_options={"max_tokens": 1024, "source": "auto"})


def timed_run(executor, masks) -> tuple[float, dict]:
    got = {}
    t = time.perf_counter()
    executor.evaluate(masks, lambda ev: got.__setitem__(ev.mask, ev))
    return time.perf_counter() - t, got


def main() -> None:
    cores = os.cpu_count() or 2
    t = time.perf_counter()
    local_ev = SPEC.build()
    shape = local_ev.loaded.layout.shape
    masks = random_masks(10, shape, 0.01, 0.20, seed=11)[1:]
    warm, masks = masks[:2], masks[2:]
    local = LocalExecutor(local_ev)
    local.evaluate([HeadMask.all_active(*shape), *warm], lambda ev: None)
    setups = {"in_process": time.perf_counter() - t}
    seconds, ref = timed_run(local, masks)
    rows = {"in_process": {"seconds": seconds, "workers": 0, "threads": torch.get_num_threads()}}
    print(f"in-process: {len(masks)} masks in {seconds:.1f} s")
    expected = local_ev.describe()
    local_ev.close()
    del local, local_ev

    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for workers in (1, 2):
            name = f"ray_x{workers}"
            t = time.perf_counter()
            ex = RayExecutor(SPEC, workers=workers, cpus_per_worker=cores / workers, expected=expected)
            ex.evaluate(warm, lambda ev: None)  # every worker builds its layer caches
            setups[name] = time.perf_counter() - t
            seconds, got = timed_run(ex, masks)
            diff = max(abs(got[m].bias / ref[m].bias - 1) for m in masks)
            rows[name] = {"seconds": seconds, "workers": workers, "cpus_per_worker": cores / workers,
                          "max_rel_bias_diff_vs_in_process": diff}
            print(f"{name}: {len(masks)} masks in {seconds:.1f} s (start-up {setups[name]:.1f} s, "
                  f"max rel. bias diff vs in-process {diff:.1e})")
            ex.close()
    finally:
        ray.shutdown()
    base = rows["in_process"]["seconds"]
    for r in rows.values():
        r["per_minute"] = 60 * len(masks) / r["seconds"]
        r["speed_vs_in_process"] = base / r["seconds"]
    print("steady state, masks per minute: " + ", ".join(f"{k} {v['per_minute']:.1f} ({v['speed_vs_in_process']:.2f}x)"
                                                       for k, v in rows.items()))
    write("ray_scaling", {"setup": {"model": "smollm2-135m", "split": "valid", "masks": len(masks),
                                    "pruned": [m.n_pruned for m in masks], "cores": cores},
                          "steady_state": rows, "startup_s": setups})


if __name__ == "__main__":
    main()
