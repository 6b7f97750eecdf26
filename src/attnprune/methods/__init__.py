"""Pruning methods behind a registry: Attention Pruning and the baselines it is compared with.

Adding a method = one new module with a :class:`Method` subclass decorated by
:func:`register_method`; import it here so it registers (the CLI's ``--methods`` choices
come from the registry).
"""

from attnprune.methods.base import (Knockouts, Method, MethodContext, Proposal, get_method, knockout_masks,
                                    method_names, register_method)
from attnprune.methods import (ap, ap_paper, random_search, random_grid, magnitude, gradient, fasp,  # noqa: F401
                               knockout_rank, direct_sa)

__all__ = ["Knockouts", "Method", "MethodContext", "Proposal", "get_method", "knockout_masks", "method_names",
           "register_method"]
