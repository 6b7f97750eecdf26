"""Search over head masks: simulated annealing of any scoring function (surrogate, real model, toy)."""

from attnprune.search.annealing import AnnealingResult, anneal

__all__ = ["AnnealingResult", "anneal"]
