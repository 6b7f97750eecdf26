"""``random_search``: random masks on Attention Pruning's evaluation budget, where the budget can hold.

As many validation evaluations as ``ap`` spent in the same comparison (or, alone, as many as
AP's default design would: screened knockouts, samples and candidates), in batches of 8.
Each mask prunes a uniformly random set of heads, its count uniform in ``[k_min, k_hi]``.
``k_hi`` is learnt from the method's own evaluations: after each batch it is the trust
region of :func:`~attnprune.selection.trust_region` (1.25 x the largest count that met the
perplexity budget, or, when only single heads met it, 1.25 x the count its masks' median
per-head cost predicts at the budget), or, while no mask has met it, halved toward ``k_min``. The choice is
the shared policy's, like every method's.
"""

from __future__ import annotations

import math

import numpy as np

from attnprune import labels
from attnprune.heads import HeadMask
from attnprune.methods.base import Method, MethodContext, Proposal, register_method
from attnprune.selection import largest_feasible, trust_region

BATCH = 8


@register_method("random_search")
class RandomSearch(Method):
    """Random search with AP's evaluation budget (see module docstring)."""

    description = "random masks on AP's evaluation budget, within the pruned counts where the budget holds"

    def propose(self, ctx: MethodContext) -> Proposal:
        n_evals = ctx.evaluation_budget or ctx.default_budget()
        base = ctx.base()
        budget = ctx.policy.budget(base)
        k_min, k_max = ctx.bounds
        hi = k_max
        rng = np.random.default_rng([ctx.seed, 7919])
        rows, seen = [base], {base.mask.key}
        space = sum(math.comb(ctx.n_total, k) for k in range(k_min, k_max + 1))
        cells = np.flatnonzero(ctx.heads)
        while len(rows) < min(n_evals, space + 1):
            batch: list[HeadMask] = []
            for _ in range(1000 * BATCH):  # a small space can run out of new masks
                if len(batch) == min(BATCH, n_evals - len(rows)):
                    break
                k = int(rng.integers(k_min, hi + 1))
                heads = cells[rng.choice(ctx.n_total, size=k, replace=False)]
                m = HeadMask.from_pruned(*ctx.shape, [divmod(int(h), ctx.shape[1]) for h in heads])
                if m.key not in seen:
                    seen.add(m.key)
                    batch.append(m)
            if not batch:
                break
            rows += ctx.evaluate(batch, labels.method(self.name), f"{self.name}: random masks (valid)")
            feasible = largest_feasible(rows, budget) > 0
            hi = trust_region(rows, budget, k_min, k_max)[1] if feasible else max(k_min, (k_min + hi) // 2)
        evaluated = rows[1:]
        return Proposal(rows, len(rows), float(sum(r.seconds for r in evaluated)) + base.seconds,
                        f"{len(evaluated)} random masks of {k_min}-{k_max} heads (last range {k_min}-{hi})",
                        stage_of={r.mask.key: "candidates" for r in evaluated})
