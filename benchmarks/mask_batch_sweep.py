"""Does evaluating several masks in one forward batch (one mask per row) pay? A sweep, one run.

The repair's validation evaluation (all speed-ups on) of the same 8 random masks of the
repair's sampler, with 1, 2, 4 and 8 masks per forward batch (``--mask-batch``), on the
default model. On a CPU the forward already keeps the cores busy with one mask, so larger
batches are expected to add no throughput; on a GPU one mask leaves the device idle.

    .venv/bin/python benchmarks/mask_batch_sweep.py
"""

from __future__ import annotations

import time

from attnprune import HeadMask, load_model
from attnprune.evaluation import Evaluator
from attnprune.executors import LocalExecutor
from attnprune.methods.samplers import random_masks
from common import write

BATCHES = (1, 2, 4, 8)


def main() -> None:
    lm = load_model("smollm2-135m")
    shape = lm.layout.shape
    masks = random_masks(8, shape, 0.01, 0.20, seed=13)[1:]
    ev = Evaluator(lm, bias="likelihood", split="valid", bias_options={"prompts": 160, "seed": 0, "bootstrap_reps": 200},
                   perplexity_options={"max_tokens": 1024, "source": "auto"})
    ev.evaluate([HeadMask.all_active(*shape)])  # builds the caches
    rows = {}
    for b in BATCHES:
        t = time.perf_counter()
        LocalExecutor(ev, b).evaluate(masks, lambda result: None)
        seconds = time.perf_counter() - t
        rows[b] = {"seconds": seconds, "per_minute": 60 * len(masks) / seconds}
    for b in BATCHES:
        rows[b]["vs_one_mask"] = rows[b]["per_minute"] / rows[1]["per_minute"]
        print(f"mask batch {b}: {rows[b]['per_minute']:.1f} masks/min ({rows[b]['vs_one_mask']:.2f}x one mask per batch)")
    write("mask_batch_sweep", {"setup": {"model": "smollm2-135m", "split": "valid", "masks": len(masks),
                                         "pruned": [m.n_pruned for m in masks], "device": str(lm.device)},
                               "mask_batch": {str(b): r for b, r in rows.items()}})


if __name__ == "__main__":
    main()
