"""``fasp``: Fairness-Aware Structured Pruning (Zayed et al., AAAI 2024), from single-head knockouts.

Score every head alone (knockout bias and perplexity, validation); protect the ``gamma``
fraction of heads whose removal raises perplexity most; among the rest prune the
``int(alpha * N)`` heads whose single removal gives the lowest bias. Candidates: the
paper code's grid, alpha 0.02..0.20 step 0.02 x gamma 0.2..0.7 step 0.1 (counts kept
within the run's pruned-count bounds).
"""

from __future__ import annotations

import numpy as np

from attnprune.heads import HeadMask
from attnprune.methods.base import ALPHAS, Method, MethodContext, Proposal, prune_lowest, register_method

GAMMAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def fasp_mask(knock_bias: np.ndarray, knock_ppl: np.ndarray, k: int, gamma: float,
              heads: np.ndarray | None = None) -> HeadMask:
    """Prune the ``k`` lowest-bias heads outside the ``gamma`` fraction with the largest knockout perplexity.

    ``heads`` (bool ``[L, H]``, default all) marks the cells that are heads.
    """
    heads = np.ones(knock_bias.shape, dtype=bool) if heads is None else np.asarray(heads, dtype=bool)
    n = int(heads.sum())
    protect = np.zeros(knock_bias.size, dtype=bool)
    ppl = np.where(heads, knock_ppl, -np.inf).reshape(-1)  # a cell that is no head is never protected
    protect[np.argsort(-ppl, kind="stable")[:int(gamma * n)]] = True
    return prune_lowest(knock_bias, k, allowed=~protect.reshape(knock_bias.shape) & heads)


@register_method("fasp")
class FASP(Method):
    """FASP's alpha x gamma grid over knockout scores (see module docstring)."""

    description = "FASP (Zayed et al. 2024): knockout scores, protect perplexity-critical heads, prune lowest bias"
    uses_knockouts = True

    def propose(self, ctx: MethodContext) -> Proposal:
        knock = ctx.knockouts()
        masks = [fasp_mask(knock.bias, knock.perplexity, k, g, ctx.heads) for k in ctx.counts(ALPHAS) for g in GAMMAS]
        return self.proposal(ctx, list(dict.fromkeys(masks)))
