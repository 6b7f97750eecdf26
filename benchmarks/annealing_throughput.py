"""Annealing throughput on a surrogate: vectorised chains vs one state at a time, one run.

Fits the default MLP surrogate on random data of the default model's size (270 heads),
then scores states with the annealer's vectorised chains and with a plain Python loop of
single-state annealing steps on the same surrogate. Writes
benchmarks/results/annealing_throughput.json.

    .venv/bin/python benchmarks/annealing_throughput.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from attnprune.search.annealing import anneal
from attnprune.surrogate import MLPSurrogate
from common import write

N = 270


def main() -> None:
    rng = np.random.default_rng(0)
    X = (rng.random((150, N)) > 0.1).astype(np.float32)
    y = X @ rng.normal(size=N)
    model = MLPSurrogate(seed=0, epochs=50).fit(X, y)
    cost = model.predict_torch

    rows = {}
    for chains in (512, 2048):
        res = anneal(cost, N, 2, 54, chains=chains, steps=400, seed=0)
        rows[f"vectorised_{chains}_chains"] = res.states_per_second
    # one state at a time: the same Metropolis step, one chain, no batching
    state = torch.ones(1, N)
    state[0, :20] = 0
    c = cost(state)
    steps = 3000
    t = time.perf_counter()
    with torch.no_grad():
        for k in range(steps):
            h = int(rng.integers(N))
            prop = state.clone()
            prop[0, h] = 1 - prop[0, h]
            cp = cost(prop)
            if cp <= c or rng.random() < float(torch.exp(-(cp - c) / 0.1)):
                state, c = prop, cp
    rows["one_state_loop"] = steps / (time.perf_counter() - t)
    for k, v in rows.items():
        print(f"{k:28s} {v:12,.0f} states/s")
    best = max(v for k, v in rows.items() if k.startswith("vectorised"))
    print(f"vectorised vs one-state loop: {best / rows['one_state_loop']:.0f}x; target >= 100,000 states/s: "
          f"{'met' if best >= 1e5 else 'NOT met'}")
    write("annealing_throughput", {"setup": {"heads": N, "surrogate": "MLP 270-256-128-1"}, "states_per_s": rows,
                                   "speedup": best / rows["one_state_loop"]})


if __name__ == "__main__":
    main()
