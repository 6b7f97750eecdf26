"""``ap_paper``: Attention Pruning as the paper describes it, on AP's evaluation budget.

Random masks with a pruning ratio r ~ U(r_min, r_max) (the all-active mask included), the
paper's MLP surrogates (N -> 256 -> 128 -> 1, on log-perplexity), simulated annealing at the
budget tau only, and one round of ``top_k`` candidates validated on the real model. It
spends as many validation evaluations as ``ap`` did in the same comparison (samples =
that count - 1 - top_k, at least 10), so the comparison shows what ``ap``'s additions (the
first-order screen, knockouts, samples near the budget, the additive surrogate, the budget
ladder, the rounds and the calibration) buy at equal cost. Its evaluations are stored under
its own labels (``ap_paper:sample``, ``ap_paper:candidate-r0``).
"""

from __future__ import annotations

from attnprune.methods.ap import AttentionPruning
from attnprune.methods.base import MethodContext, Proposal, register_method


@register_method("ap_paper")
class PaperAttentionPruning(AttentionPruning):
    """The paper's design end to end (see module docstring)."""

    description = "the paper's Attention Pruning: U(r_min, r_max) samples, MLP surrogates, annealing, top-k validation"
    prefix = "ap_paper:"
    ladder = (1.0,)
    sets_budget = False  # it spends AP's budget

    def propose(self, ctx: MethodContext) -> Proposal:
        c = ctx.options
        n_evals = ctx.evaluation_budget or ctx.default_budget()
        self.overrides = {"sampler": "paper", "surrogate": "mlp", "samples": max(10, n_evals - 1 - c.top_k),
                          "rounds": 1, "calibrate": 0, "trim": 0, "anchor_prompts": 0, "guard_search": False}
        return super().propose(ctx)
