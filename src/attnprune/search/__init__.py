"""Search over head masks: simulated annealing (any scoring function) and baselines."""

from attnprune.search.annealing import AnnealingResult, anneal

__all__ = ["AnnealingResult", "anneal"]
