"""The selection policy every method shares: the perplexity budget, the search cost, the choice.

- :class:`Budget`: at most ``(1 + tau)`` x the unrepaired model's validation perplexity.
- :func:`budget_cost`: the cost the annealer minimises, on a surrogate (AP) or on the real
  model (``direct_sa``): bias + a penalty for log-perplexity above the budget.
- :func:`trust_region`: the largest pruned count worth searching, from where evaluated
  masks met the budget.
- :meth:`SelectionPolicy.choose`: the lowest validation bias among a method's evaluated
  candidates that prune something, meet the budget and beat the unrepaired model.

One policy for AP and every baseline, so that a comparison compares the methods'
candidates, not their selection rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from attnprune.errors import UserError
from attnprune.search.annealing import Cost
from attnprune.store import StoredEvaluation

# states [chains, N] (1 = active) -> (bias [chains], log-perplexity [chains])
Predict = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Budget:
    """The perplexity budget: ``(1 + tau) x base_perplexity``."""

    base_perplexity: float
    tau: float

    @property
    def limit(self) -> float:
        """The largest admissible perplexity."""
        return self.base_perplexity * (1 + self.tau)

    def holds(self, perplexity: float) -> bool:
        """Whether ``perplexity`` is within the budget."""
        return perplexity <= self.limit


def budget_cost(predict: Predict, log_budget: float, weight: float, unit: float) -> Cost:
    """``bias + weight * max(0, log_ppl - log_budget) / unit`` of each state (see module docstring)."""

    def cost(states: torch.Tensor) -> torch.Tensor:
        b, lp = predict(states)
        return b + weight * torch.clamp(lp - log_budget, min=0) / unit

    return cost


def trust_region(rows: Sequence[StoredEvaluation], budget: Budget, k_min: int, k_max: int,
                 slack: float = 1.25) -> tuple[int, int]:
    """``[k_min, k_max]`` with ``k_max`` cut to ``slack`` x the largest pruned count that met the budget.

    Surrogates fitted on ~100 masks are easy to fool far from the data (on SmolLM2 the
    annealer found 54-head masks predicted at +3% perplexity that measured +60%).
    """
    feasible = [r.mask.n_pruned for r in rows if budget.holds(r.perplexity) and r.mask.n_pruned > 0]
    if feasible:
        k_max = max(k_min, min(k_max, int(math.ceil(max(feasible) * slack))))
    return k_min, k_max


@dataclass(frozen=True)
class SelectionPolicy:
    """Budget, cost and choice with the run's ``tau`` and ``penalty``."""

    tau: float
    penalty: float

    def budget(self, base: StoredEvaluation) -> Budget:
        """The budget relative to the unrepaired model's evaluation ``base``."""
        return Budget(base.perplexity, self.tau)

    @property
    def unit(self) -> float:
        """Log-perplexity excess that costs ``penalty`` bias standard deviations."""
        return math.log(1 + max(self.tau, 1e-3))

    def cost(self, predict: Predict, base_log_perplexity: float, bias_scale: float) -> Cost:
        """The annealing cost: ``predict``'s bias plus the budget penalty (relative to ``base_log_perplexity``)."""
        return budget_cost(predict, base_log_perplexity + math.log(1 + self.tau), self.penalty * bias_scale, self.unit)

    def best_within_budget(self, rows: Sequence[StoredEvaluation], base: StoredEvaluation) -> StoredEvaluation | None:
        """Lowest validation bias among ``rows`` that prune something, meet the budget and beat ``base``."""
        budget = self.budget(base)
        ok = [r for r in rows if r.mask.n_pruned > 0 and budget.holds(r.perplexity) and r.bias < base.bias]
        return min(ok, key=lambda r: r.bias) if ok else None

    def choose(self, rows: Sequence[StoredEvaluation], base: StoredEvaluation) -> StoredEvaluation:
        """:meth:`best_within_budget`, or one sentence saying what to change."""
        best = self.best_within_budget(rows, base)
        if best is None:
            raise UserError(
                f"No evaluated mask lowers validation bias below {base.bias:.3f} while keeping perplexity within "
                f"{1 + self.tau:.2f} x {base.perplexity:.2f}; raise --tau, --samples or --rounds (the store keeps "
                "every evaluation, so a rerun continues)."
            )
        return best

    def rule(self) -> str:
        """The choice rule in words (for reports)."""
        return (f"lowest validation bias among the method's evaluated masks that prune at least one head, keep "
                f"validation perplexity within {1 + self.tau:.2f} x the unrepaired model's and lower bias below it")
