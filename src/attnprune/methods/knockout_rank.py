"""``bias_only`` and ``ppl_only``: rank heads by one knockout score alone, prune the best at each ratio."""

from __future__ import annotations

from attnprune.methods.base import Method, MethodContext, Proposal, prune_lowest, register_method


@register_method("bias_only")
class BiasOnly(Method):
    """Prune the heads whose knockout gives the lowest bias, at each ratio of FASP's grid."""

    description = "prune the heads whose single knockout gives the lowest validation bias"
    uses_knockouts = True

    def propose(self, ctx: MethodContext) -> Proposal:
        knock = ctx.knockouts()
        return self.proposal(ctx, [prune_lowest(knock.bias, k) for k in ctx.counts()])


@register_method("ppl_only")
class PerplexityOnly(Method):
    """Prune the heads whose knockout raises perplexity least, at each ratio of FASP's grid."""

    description = "prune the heads whose single knockout raises validation perplexity least"
    uses_knockouts = True

    def propose(self, ctx: MethodContext) -> Proposal:
        knock = ctx.knockouts()
        return self.proposal(ctx, [prune_lowest(knock.perplexity, k) for k in ctx.counts()])
