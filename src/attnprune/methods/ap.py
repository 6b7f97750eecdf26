"""``ap``: Attention Pruning (Dasu et al., arXiv 2503.15815), as stages on a run.

1. ``sample``: random masks (ratio r ~ U(r_min, r_max), floor(r * N) heads) plus the
   all-active mask, each evaluated on the real model (validation split) and committed to
   the run's store as it completes.
2. ``fit``: surrogates mask -> bias and mask -> log-perplexity, with K-fold metrics and the
   ridge reference.
3. ``search``: simulated annealing on the surrogates under the perplexity budget, inside
   the trust region of pruned counts where evaluated masks met the budget.
4. ``validate``: the best ``top_k`` new candidates on the real model (validation). Rounds
   repeat 2-4 with the surrogates refitted on the new evaluations.

Every stage after sampling reruns from the store alone (``attnprune fit``/``search``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.methods.base import Method, MethodContext, Proposal, register_method
from attnprune.results import AnnealingSummary, Candidate, SearchDetails
from attnprune.run import Run
from attnprune.search.annealing import AnnealingResult, anneal
from attnprune.selection import SelectionPolicy, trust_region
from attnprune.store import StoredEvaluation
from attnprune.surrogate import SurrogatePair, fit_surrogates


def random_masks(n: int, shape: tuple[int, int], r_min: float, r_max: float, seed: int) -> list[HeadMask]:
    """The all-active mask, then ``n`` random masks; a larger ``n`` extends the same sequence."""
    total = shape[0] * shape[1]
    k_lo, k_hi = max(1, int(math.floor(r_min * total))), max(1, int(math.floor(r_max * total)))
    space = sum(math.comb(total, k) for k in range(k_lo, k_hi + 1))
    if n > space:
        raise UserError(
            f"Only {space} distinct masks prune {k_lo}-{k_hi} of {total} heads; lower --samples to at most {space} "
            "or widen --r-min/--r-max."
        )
    rng = np.random.default_rng(seed)
    masks = [HeadMask.all_active(*shape)]
    seen = {masks[0].key}
    while len(masks) < n + 1:
        k = max(1, int(math.floor(rng.uniform(r_min, r_max) * total)))
        pruned = rng.choice(total, size=k, replace=False)
        m = HeadMask.from_pruned(*shape, [divmod(int(i), shape[1]) for i in pruned])
        if m.key not in seen:
            seen.add(m.key)
            masks.append(m)
    return masks


def round_sources(rounds: int) -> list[str]:
    """Store sources of the samples and of the candidates of the first ``rounds`` rounds."""
    return ["sample"] + [f"candidate-r{j}" for j in range(rounds)]


@register_method("ap")
class AttentionPruning(Method):
    """Sample, fit surrogates, anneal on them, validate candidates (see module docstring)."""

    description = "Attention Pruning: random samples, surrogate networks, simulated annealing on the surrogates"

    # ---- stages -------------------------------------------------------------------------
    def sample(self, run: Run) -> list[StoredEvaluation]:
        """Stage 1: evaluate the all-active mask and ``cfg.samples`` random masks."""
        c = run.cfg
        with run.timed("sample"):
            masks = random_masks(c.samples, run.shape, c.r_min, c.r_max, c.seed)
            _ = run.valid
            done = len(run.store.keys(run.valid_setting) & {m.key for m in masks})
            if done:
                run.log(f"store {run.store.path}: {done} of {len(masks)} sample masks already evaluated, continuing")
            return run.evaluate(masks, "sample", "sampling (valid)")

    def training_data(self, run: Run, before_round: int | None = None):
        """(X bits, bias, log-perplexity, rows) of the samples and the candidates of rounds before ``before_round``.

        With ``before_round=r`` a rerun's round ``r`` sees the same data as the first run's.
        """
        rows = run.rows(None if before_round is None else round_sources(before_round))
        X = np.stack([r.mask.bits for r in rows])
        return X, np.array([r.bias for r in rows]), np.log(np.clip([r.perplexity for r in rows], 1e-6, 1e6)), rows

    def fit(self, run: Run, round_: int | None = None) -> SurrogatePair:
        """Stage 2: fit both surrogates on the validation evaluations (those before ``round_`` when given)."""
        with run.timed("fit"):
            X, bias, logppl, _ = self.training_data(run, round_)
            return fit_surrogates(X, bias, logppl, kind=run.cfg.surrogate, seed=run.cfg.seed)

    def search(self, run: Run, pair: SurrogatePair, policy: SelectionPolicy,
               round_: int | None = None) -> tuple[AnnealingResult, tuple[int, int]]:
        """Stage 3: anneal on the surrogates inside the trust region; returns the result and the bounds used."""
        c = run.cfg
        with run.timed("search"):
            _, bias, _, rows = self.training_data(run, round_)
            bounds = trust_region(rows, policy.budget(run.base()), *run.bounds)
            # the budget is relative to the surrogate's own prediction for the unrepaired model, so
            # that a constant offset of the surrogate does not put every state over budget
            _, base_lp = pair.predict_torch(torch.ones(1, run.n_total))
            cost = policy.cost(pair.predict_torch, float(base_lp[0]), float(np.std(bias) or 1.0))
            res = anneal(cost, run.n_total, *bounds, chains=c.chains, steps=c.steps, seed=c.seed + 1000 * (round_ or 0),
                         t0=c.t0, cooling=c.cooling, top=max(50, 4 * c.top_k))
        return res, bounds

    def validate(self, run: Run, result: AnnealingResult, pair: SurrogatePair, round_: int) -> list[Candidate]:
        """Stage 4: evaluate the best ``top_k`` new candidates on the real model (validation)."""
        with run.timed("validate"):
            known = {r.mask.key for r in self.training_data(run, round_)[3]}
            picked: list[HeadMask] = []
            for state in result.states:
                m = HeadMask(state.reshape(run.shape))
                if m.key not in known and m not in picked:
                    picked.append(m)
                if len(picked) == run.cfg.top_k:
                    break
            if not picked:
                return []
            rows = run.evaluate(picked, f"candidate-r{round_}", f"validating candidates, round {round_ + 1}")
            pb, plp = pair.predict_torch(torch.as_tensor(np.stack([m.bits for m in picked])))
        return [Candidate(round=round_, n_pruned=m.n_pruned, pruned=[list(p) for p in m.pruned],
                          predicted_bias=float(b), predicted_perplexity=float(math.exp(lp)), bias=r.bias,
                          perplexity=r.perplexity)
                for m, r, b, lp in zip(picked, rows, pb, plp)]

    # ---- the method ---------------------------------------------------------------------
    def propose(self, ctx: MethodContext) -> Proposal:
        run, c = ctx.run, ctx.run.cfg
        self.sample(run)
        details = SearchDetails()
        for r in range(c.rounds):
            pair = self.fit(run, r)
            cv = pair.metrics["cv"]
            details.surrogates.append({"round": r, **pair.metrics})
            run.log(f"round {r + 1}: surrogates on {pair.metrics['samples']} masks, CV Spearman "
                    f"bias {cv['bias'][c.surrogate]['spearman']:.2f} (ridge {cv['bias']['ridge']['spearman']:.2f}), "
                    f"log-ppl {cv['log_perplexity'][c.surrogate]['spearman']:.2f} "
                    f"(ridge {cv['log_perplexity']['ridge']['spearman']:.2f})")
            res, bounds = self.search(run, pair, ctx.policy, r)
            details.annealing.append(AnnealingSummary(
                round=r, pruned_bounds=list(bounds), t0=res.t0, states_scored=res.states_scored, seconds=res.seconds,
                states_per_second=res.states_per_second, best_cost=float(res.costs[0]), trace=res.trace))
            run.log(f"round {r + 1}: annealed {res.states_scored:,} states with {bounds[0]}-{bounds[1]} heads pruned "
                    f"in {res.seconds:.1f} s ({res.states_per_second:,.0f}/s)")
            details.candidates.extend(self.validate(run, res, pair, r))
        rows = run.rows(round_sources(c.rounds))
        return Proposal(rows, len(rows), float(sum(r.seconds for r in rows)),
                        f"{c.samples} samples + {c.rounds} rounds x {c.top_k} candidates", details)
