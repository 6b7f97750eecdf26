"""Simulated annealing over head masks, many chains at once.

The annealer never sees a model: it takes a scoring function ``cost(states) -> [chains]``
over a float tensor ``[chains, N]`` of mask bits (1 = active). The same code anneals on a
surrogate (thousands of chains, microseconds per state), on the real evaluator (one
chain, "direct SA"), or on a toy function in tests.

Move: flip one uniformly chosen head per chain; a flip that would take the pruned count
outside ``[k_min, k_max]`` is rejected. Acceptance: Metropolis, ``exp(-delta / T)``.
Initial temperature: given, or estimated so that random uphill moves from random states
are accepted with probability ``accept_ratio`` (``T0 = -mean(uphill delta) / ln(ratio)``).
Cooling: ``log`` (T0 / ln(2 + k)), ``geometric`` (T0 * alpha^k, alpha set so the final
temperature is ``final_fraction * T0``), or ``exponential`` (T0 * exp(-rate * k / steps)).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

Cost = Callable[[torch.Tensor], torch.Tensor]
COOLING = ("log", "geometric", "exponential")


@dataclass
class AnnealingResult:
    """Best distinct states found, best first, with run statistics."""

    states: np.ndarray  # [k, N] bool, True = active
    costs: np.ndarray  # [k]
    t0: float
    states_scored: int
    seconds: float
    trace: list[float] = field(default_factory=list)  # best cost after each 1% of the steps

    @property
    def states_per_second(self) -> float:
        """Throughput of the scoring function inside the annealer."""
        return self.states_scored / max(self.seconds, 1e-9)


def _random_states(chains: int, n: int, k_min: int, k_max: int, gen: torch.Generator,
                   free: torch.Tensor | None = None) -> torch.Tensor:
    k = torch.randint(k_min, k_max + 1, (chains,), generator=gen)
    values = torch.rand(chains, n, generator=gen)
    if free is not None:
        values = values + (~free).float() * 2  # heads that may not be pruned rank last
    ranks = values.argsort(dim=1).argsort(dim=1)
    return (ranks >= k.unsqueeze(1)).float()  # the k lowest-ranked heads pruned


def _draw_heads(chains: int, n: int, gen: torch.Generator, free_idx: torch.Tensor | None) -> torch.Tensor:
    if free_idx is None:
        return torch.randint(0, n, (chains,), generator=gen)
    return free_idx[torch.randint(0, len(free_idx), (chains,), generator=gen)]


def _flip(states: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    out = states.clone()
    rows = torch.arange(states.shape[0])
    out[rows, heads] = 1.0 - out[rows, heads]
    return out


def estimate_t0(cost: Cost, n: int, k_min: int, k_max: int, gen: torch.Generator, accept_ratio: float = 0.75,
                samples: int = 256, free: torch.Tensor | None = None) -> float:
    """Temperature at which random uphill moves are accepted with probability ``accept_ratio``."""
    states = _random_states(samples, n, k_min, k_max, gen, free)
    heads = _draw_heads(samples, n, gen, None if free is None else torch.nonzero(free).flatten())
    proposal = _flip(states, heads)
    k_new = n - proposal.sum(1)
    ok = (k_new >= k_min) & (k_new <= k_max)
    delta = (cost(proposal) - cost(states))[ok]
    uphill = delta[delta > 0]
    if len(uphill) == 0:
        return 1e-3
    return float(-uphill.mean() / math.log(accept_ratio))


def temperature(schedule: str, t0: float, step: int, steps: int, final_fraction: float = 1e-3) -> float:
    """Temperature at ``step`` of ``steps``."""
    if schedule == "log":
        return t0 / math.log(2 + step)
    if schedule == "geometric":
        return t0 * final_fraction ** (step / max(1, steps - 1))
    if schedule == "exponential":
        return t0 * math.exp(-step * 5.0 / max(1, steps))
    raise ValueError(f"unknown cooling schedule {schedule!r}; choose one of {COOLING}")


@torch.no_grad()
def anneal(cost: Cost, n: int, k_min: int, k_max: int, chains: int = 256, steps: int = 2000, seed: int = 0,
           t0: float | None = None, accept_ratio: float = 0.75, cooling: str = "geometric", top: int = 20,
           initial: torch.Tensor | None = None, progress: Callable[[int], None] | None = None,
           free: torch.Tensor | np.ndarray | None = None) -> AnnealingResult:
    """Minimise ``cost`` over masks of ``n`` heads with ``k_min..k_max`` pruned (see module docstring).

    ``free`` (bool ``[n]``) restricts the search to those heads; the others stay active.
    """
    free_idx = None
    if free is not None:
        free = torch.as_tensor(np.asarray(free, dtype=bool))
        free_idx = torch.nonzero(free).flatten()
        k_max = min(k_max, len(free_idx))
        k_min = min(k_min, k_max)
    if not 0 <= k_min <= k_max <= n:
        raise ValueError(f"need 0 <= k_min <= k_max <= n, got {k_min}, {k_max}, {n}")
    if cooling not in COOLING:
        raise ValueError(f"unknown cooling schedule {cooling!r}; choose one of {COOLING}")
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    scored = 0
    if t0 is None:
        t0 = estimate_t0(cost, n, k_min, k_max, gen, accept_ratio, free=free)
        scored += 512
    states = initial.clone().float() if initial is not None else _random_states(chains, n, k_min, k_max, gen, free)
    chains = states.shape[0]
    costs = cost(states)
    scored += chains
    best_states, best_costs = states.clone(), costs.clone()
    # every distinct state that was ever a chain's best, with its cost
    seen: dict[bytes, float] = {}
    trace = []
    for step in range(steps):
        temp = temperature(cooling, t0, step, steps)
        heads = _draw_heads(chains, n, gen, free_idx)
        proposal = _flip(states, heads)
        k_new = n - proposal.sum(1)
        valid = (k_new >= k_min) & (k_new <= k_max)
        # only proposals inside the bounds are scored (on a real model each score is an evaluation)
        new_costs = torch.full((chains,), float("inf"))
        if bool(valid.all()):
            new_costs = cost(proposal)
        elif bool(valid.any()):
            new_costs[valid] = cost(proposal[valid]).to(new_costs.dtype)
        scored += int(valid.sum())
        delta = new_costs - costs
        u = torch.rand(chains, generator=gen)
        accept = valid & ((delta <= 0) | (u < torch.exp(-delta.clamp(min=0) / max(temp, 1e-12))))
        states = torch.where(accept.unsqueeze(1), proposal, states)
        costs = torch.where(accept, new_costs, costs)
        improved = costs < best_costs
        if bool(improved.any()):
            best_states[improved] = states[improved]
            best_costs[improved] = costs[improved]
            for row in torch.nonzero(improved).flatten().tolist():
                seen[np.packbits(best_states[row].numpy().astype(bool)).tobytes()] = float(best_costs[row])
        if steps >= 100 and step % (steps // 100) == 0:
            trace.append(float(best_costs.min()))
            if progress:
                progress(step)
    for row in range(chains):
        seen.setdefault(np.packbits(best_states[row].numpy().astype(bool)).tobytes(), float(best_costs[row]))
    ranked = sorted(seen.items(), key=lambda kv: kv[1])[:top]
    out_states = np.stack([np.unpackbits(np.frombuffer(k, dtype=np.uint8))[:n].astype(bool) for k, _ in ranked])
    return AnnealingResult(out_states, np.array([c for _, c in ranked]), t0, scored, time.perf_counter() - start, trace)
