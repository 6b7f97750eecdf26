"""Measurements behind a registry: bias measures and perplexity.

Adding a measure = one new module with a class decorated by :func:`register` and a
:class:`Card`; import it here so it registers.
"""

from attnprune.benchmarks.base import Card, Measure, get_measure, measure_names, register
from attnprune.benchmarks import likelihood, perplexity, toxicity  # noqa: F401  (registration)

__all__ = ["Card", "Measure", "get_measure", "measure_names", "register"]
