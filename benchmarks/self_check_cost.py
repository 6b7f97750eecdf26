"""Seconds of the load-time masking self-check (``heads.check_masking``) on the packaged models, beside the load.

Issue target: under 1 s on the default model. Both presets are loaded from the converted
cache (the first run converts the GGUF files), then the check is timed 5 times (best and
median), next to the load's own seconds, in one run.

    .venv/bin/python benchmarks/self_check_cost.py

Writes ``benchmarks/results/self_check_cost.json``.
"""

from __future__ import annotations

import statistics
import time

from attnprune.heads import check_masking
from attnprune.models import load_model
from common import write


def main() -> None:
    rows = []
    for preset in ("smollm2-135m", "gemma3-270m"):
        load_model(preset)  # converts once into the cache
        t = time.perf_counter()
        loaded = load_model(preset)  # includes one self-check
        load_s = time.perf_counter() - t
        times = []
        for _ in range(5):
            t = time.perf_counter()
            check_masking(loaded.model, loaded.layout)
            times.append(time.perf_counter() - t)
        rows.append({"model": preset, "load_s_with_check": load_s, "check_best_s": min(times),
                     "check_median_s": statistics.median(times), "share_of_load": statistics.median(times) / load_s})
        r = rows[-1]
        print(f"{preset}: self-check {r['check_median_s']:.3f} s (best {r['check_best_s']:.3f} s); load with it "
              f"{load_s:.2f} s ({100 * r['share_of_load']:.0f}% of the load)")
    write("self_check_cost", {"rows": rows, "target_s": 1.0})


if __name__ == "__main__":
    main()
