"""``bias_only`` and ``ppl_only``: rank heads by one knockout score alone, prune the best at each ratio."""

from __future__ import annotations

from attnprune.methods.base import Method, MethodContext, Proposal, register_method


class KnockoutRanking(Method):
    """Prune the heads with the lowest knockout ``score`` (an attribute of the knockouts) at each ratio."""

    score = ""
    uses_knockouts = True

    def propose(self, ctx: MethodContext) -> Proposal:
        scores = getattr(ctx.knockouts(), self.score)
        return self.proposal(ctx, ctx.lowest_masks(scores))


@register_method("bias_only")
class BiasOnly(KnockoutRanking):
    """Prune the heads whose knockout gives the lowest bias, at each ratio of FASP's grid."""

    description = "prune the heads whose single knockout gives the lowest validation bias"
    score = "bias"


@register_method("ppl_only")
class PerplexityOnly(KnockoutRanking):
    """Prune the heads whose knockout raises perplexity least, at each ratio of FASP's grid."""

    description = "prune the heads whose single knockout raises validation perplexity least"
    score = "perplexity"
