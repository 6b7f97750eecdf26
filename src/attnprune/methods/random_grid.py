"""``random_grid``: one uniformly random mask per ratio of FASP's grid (seeded): about ten evaluations.

A cheap reference point, not random search: ``random_search`` spends Attention Pruning's
evaluation budget on random masks.
"""

from __future__ import annotations

import numpy as np

from attnprune.methods.base import Method, MethodContext, Proposal, prune_lowest, register_method


@register_method("random_grid")
class RandomGrid(Method):
    """One uniformly random mask per pruned count of the grid."""

    description = "uniformly random heads, one mask per ratio of FASP's grid (about ten evaluations)"

    def propose(self, ctx: MethodContext) -> Proposal:
        rng = np.random.default_rng(ctx.seed)
        # a fresh draw per count (one shared draw would nest the masks)
        return self.proposal(ctx, [prune_lowest(rng.random(ctx.shape), k, allowed=ctx.heads) for k in ctx.counts()])
