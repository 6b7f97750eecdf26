"""``gradient``: prune the heads whose gate gradient of the perplexity loss is smallest, at each ratio.

Importance of a head = sum over the validation perplexity windows of |d NLL / d gate|,
all gates at 1 (computed by the backend through the masking hooks).
"""

from __future__ import annotations

from attnprune.methods.base import Method, MethodContext, Proposal, register_method


@register_method("gradient")
class Gradient(Method):
    """Least important heads by gate gradient at each ratio of FASP's grid."""

    description = "prune the heads with the smallest |d NLL / d gate| on validation text"

    def propose(self, ctx: MethodContext) -> Proposal:
        scores = ctx.gate_gradients()
        return self.proposal(ctx, ctx.lowest_masks(scores))
