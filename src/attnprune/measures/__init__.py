"""Measures behind a registry: bias measures and perplexity, each with its card.

Adding a measure = one new module with a class decorated by :func:`register` and a
:class:`Card`; import it here so it registers.
"""

from attnprune.measures.base import (Card, Measure, accepted_options, get_measure, measure_class, measure_names,
                                     register)
from attnprune.measures import crows_pairs, likelihood, perplexity, stereoset, toxicity  # noqa: F401  (registration)

__all__ = ["Card", "Measure", "accepted_options", "get_measure", "measure_class", "measure_names", "register"]
