"""``direct_sa``: the repair's annealer run on the real model instead of the surrogates.

One chain, one LLM evaluation per step (a revisited mask comes from the store), as many
steps as Attention Pruning's evaluations (``samples + 1 + rounds x top_k``), the same cost
(:meth:`~attnprune.selection.SelectionPolicy.cost`) and bounds. The initial temperature is
half the spread of the sampled masks' bias (estimating it would cost hundreds of
evaluations); without samples in the store, of the unrepaired bias.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnprune import labels
from attnprune.heads import HeadMask
from attnprune.methods.base import Method, MethodContext, Proposal, register_method
from attnprune.search.annealing import anneal


@register_method("direct_sa")
class DirectAnnealing(Method):
    """Simulated annealing with the real model as the cost (see module docstring)."""

    description = "the same annealer on the real model, with AP's LLM-evaluation budget"

    def propose(self, ctx: MethodContext) -> Proposal:
        cfg = ctx.options
        budget = ctx.evaluation_budget or (cfg.samples + 1 + cfg.rounds * cfg.top_k)
        base = ctx.base()
        samples = ctx.rows([labels.SAMPLE])
        scale = float(np.std([r.bias for r in samples])) if len(samples) > 1 else 1.0
        seen: dict[HeadMask, object] = {}  # distinct evaluated masks, in order

        def predict(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            bias, log_ppl = [], []
            for row in states:
                mask = HeadMask(row.numpy().reshape(ctx.shape).astype(bool))
                ev = ctx.evaluate([mask], labels.method(self.name), self.name)[0]
                seen.setdefault(ev.mask, ev)
                bias.append(ev.bias)
                log_ppl.append(math.log(ev.perplexity))
            return torch.tensor(bias, dtype=torch.float64), torch.tensor(log_ppl, dtype=torch.float64)

        cost = ctx.policy.cost(predict, math.log(base.perplexity), scale)
        k_min, k_max = ctx.bounds
        anneal(lambda s: cost(s).float(), ctx.cells, k_min, k_max, chains=1, steps=max(1, budget - 1),
               seed=ctx.seed, t0=0.5 * scale, cooling=cfg.cooling, top=1, free=ctx.head_filter)
        rows = list(seen.values())
        return Proposal(rows, len(rows), float(sum(r.seconds for r in rows)),
                        f"annealing on the real model, {len(rows)} distinct evaluations ({budget} steps)")
