"""``ap``: Attention Pruning (Dasu et al., arXiv 2503.15815), as stages on a method context.

1. ``design``: the first real-model evaluations (validation split), committed to the run's
   store as they complete, by the sampler (``--sampler``, :mod:`attnprune.methods.samplers`):
   ``boundary`` (default) knocks out a screened share of the heads one at a time (shared
   with FASP), then evaluates ``samples`` random masks whose knockout-predicted perplexity
   lies near the budget; ``paper`` evaluates the paper's ``samples`` random masks with
   r ~ U(r_min, r_max).
2. ``fit``: the surrogates mask -> (bias, log-perplexity), with held-out metrics
   (``--surrogate``, :data:`attnprune.surrogate.SURROGATES`). ``additive`` (default): knockout
   effects on the measure's bucket means and on log-perplexity, refined by the multi-head
   evaluations; ``mlp`` (the paper's) and ``ridge`` fit mask bits directly.
3. ``search``: simulated annealing on the surrogates, inside the trust region of pruned
   counts where evaluated masks met the budget, at a ladder of perplexity budgets up to
   ``tau`` (candidates along the whole boundary, not only at its edge).
4. ``validate``: the best ``top_k`` new candidates on the real model (validation). Rounds
   repeat 2-4 with the surrogates refitted on the new evaluations (active learning).

The choice among everything evaluated is the shared :class:`~attnprune.selection.SelectionPolicy`'s
(by default confirmed on validation data the search never saw). Every stage after the
design reruns from the store alone (``attnprune fit``/``search``). The method sees only its
:class:`~attnprune.methods.base.MethodContext`.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from attnprune import labels
from attnprune.heads import HeadMask
from attnprune.methods.base import Method, MethodContext, Proposal, charged_totals, register_method
from attnprune.methods.samplers import Sampler, bucket_spread, make_sampler, summaries_of
from attnprune.results import AnnealingSummary, Calibration, Candidate, SearchDetails, Trim, TrimProbe
from attnprune.search.annealing import AnnealingResult, anneal
from attnprune.selection import fitting_count, trust_region, window_differences
from attnprune.store import StoredEvaluation, fingerprint
from attnprune.surrogate import TrainingSet, make_surrogate

# the search's perplexity budgets, as fractions of tau: candidates spread along the boundary
BUDGET_LADDER = (0.5, 0.75, 1.0)


class GuardPrediction:
    """A guarded axis's bias change for any mask, from every head's first-order shift of its bucket means.

    ``--guard-search``: the shifts of the pruned heads add up to the mask's bucket means, whose
    spread is the axis's bias; ``limit`` is the rise the guard allows (``--guard-margin`` x the
    unrepaired bias) and ``unit`` a tenth of that bias, the excess that costs ``--penalty`` bias
    standard deviations in the annealing.
    """

    def __init__(self, axis: str, stored: dict, margin: float):
        self.axis = axis
        self.shifts = torch.tensor(stored["shifts"], dtype=torch.float32)  # [cells, B]
        self.means = torch.tensor(stored["means"], dtype=torch.float32)
        self.weights = torch.tensor(stored["weights"], dtype=torch.float32)
        self.base = float(bucket_spread(self.means, self.weights))
        self.limit = margin * self.base
        self.unit = max(0.1 * self.base, 1e-6)
        self.prompts, self.seconds = stored["prompts"], stored["seconds"]  # what the estimates cost, for the notes

    def change(self, states: torch.Tensor) -> torch.Tensor:
        """``[chains]`` predicted change of the axis's bias for ``states`` ``[chains, cells]`` (1 = active)."""
        means = self.means + (1 - states.float()) @ self.shifts
        return bucket_spread(means, self.weights) - self.base


def guarded_cost(cost, guards: list[GuardPrediction], weight: float):
    """``cost`` plus ``weight`` for every ``unit`` of each guard's predicted rise beyond its limit (``cost`` when none)."""
    if not guards:
        return cost

    def guarded(states: torch.Tensor) -> torch.Tensor:
        out = cost(states)
        for g in guards:
            out = out + weight * torch.clamp(g.change(states) - g.limit, min=0) / g.unit
        return out

    return guarded


class Surrogates:
    """What the search anneals on: (bias, log-perplexity) predictions, and how well they held out."""

    def __init__(self, predict_torch, metrics: dict):
        self.predict_torch = predict_torch
        self.metrics = metrics


@register_method("ap")
class AttentionPruning(Method):
    """Design, fit surrogates, anneal on them, validate candidates (see module docstring)."""

    description = "Attention Pruning: real-model samples, surrogate models, simulated annealing on the surrogates"

    # store labels of this method's own evaluations (the knockouts are shared with FASP) and its options
    prefix = ""
    overrides: dict = {}
    ladder: tuple[float, ...] = BUDGET_LADDER
    sets_budget = True

    def __init__(self):
        self._samplers: dict[tuple[str, str], Sampler] = {}  # (scope, options fingerprint) -> sampler

    def options(self, ctx: MethodContext):
        """The run's options, with this variant's overrides (``ap_paper``: the paper's design)."""
        return dataclasses.replace(ctx.options, **self.overrides) if self.overrides else ctx.options

    def sampler(self, ctx: MethodContext) -> Sampler:
        """The design's sampler (``--sampler``) on this variant's options (one per run and options)."""
        c = self.options(ctx)
        key = (ctx.scope, fingerprint(c.to_dict()))
        if key not in self._samplers:
            self._samplers[key] = make_sampler(c.sampler, c)
        return self._samplers[key]

    def source(self, label: str) -> str:
        """The store source label of this method's ``label`` evaluations."""
        return self.prefix + label

    def all_rounds(self, ctx: MethodContext) -> int:
        """The search's rounds, the calibration's and, with ``--trim``, the trim's (its sub-masks' label)."""
        c = self.options(ctx)
        return c.rounds + c.calibrate + (1 if c.trim > 0 else 0)

    def round_sources(self, ctx: MethodContext, rounds: int) -> list[str]:
        """Store sources of the design and of the candidates of the first ``rounds`` rounds."""
        return self.sampler(ctx).sources(self.source) + [labels.candidates(j, self.prefix) for j in range(rounds)]

    # ---- stage 1 ------------------------------------------------------------------------
    def design(self, ctx: MethodContext) -> list[StoredEvaluation]:
        """Stage 1: the unrepaired model, then the sampler's masks (see module docstring)."""
        with ctx.timed("sample"):
            return self.sampler(ctx).design(ctx, self.source)

    def anchor(self, ctx: MethodContext) -> dict | None:
        """The unrepaired model's bucket means on up to ``anchor_prompts`` search-half prompts (kept in the store).

        None when off, or for a bias measure without bucket means. One evaluation without
        perplexity, counted in the method's cost.
        """
        c = self.options(ctx)
        if c.anchor_prompts <= 0:
            return None
        depends = {"anchor_prompts": c.anchor_prompts}
        stored = ctx.cached("anchor", depends)
        if stored is None and ctx.can_evaluate:
            ctx.log(f"the unrepaired model on up to {c.anchor_prompts:,} search prompts (the surrogate's anchor; as "
                    "many as the search half holds) ...")
            with ctx.timed("anchor"):
                stored = ctx.unrepaired_on_search_prompts(c.anchor_prompts) or {}
            ctx.keep("anchor", stored, depends)
        return stored or None

    def perplexity_prior(self, ctx: MethodContext) -> dict | None:
        """The first-order log-perplexity effect of every head on ``ppl_prior_tokens`` of the search half's text.

        ``{"log_perplexity": [N], "seconds"}``: the target toward which the additive surrogate
        shrinks each knockout's perplexity effect (kept in the store; None when off). One
        gradient pass, counted in the method's cost.
        """
        c = self.options(ctx)
        if c.ppl_prior_tokens <= 0 or c.surrogate != "additive" or not c.shrink:
            return None
        depends = {"ppl_prior_tokens": c.ppl_prior_tokens}
        stored = ctx.cached("ppl_prior", depends)
        if stored is None and ctx.can_evaluate:
            ctx.log(f"first-order estimates of every head's removal on {c.ppl_prior_tokens} tokens of the search "
                    "text (the perplexity prior) ...")
            with ctx.timed("first_order"):
                t = time.perf_counter()
                est = ctx.perplexity_removal_estimates(c.ppl_prior_tokens)
                stored = {"log_perplexity": est.tolist(), "seconds": time.perf_counter() - t}
            ctx.keep("ppl_prior", stored, depends)
        return stored

    def training_data(self, ctx: MethodContext, before_round: int | None = None) -> list[StoredEvaluation]:
        """The design's evaluations and the candidates of rounds before ``before_round`` (all when None).

        With ``before_round=r`` a rerun's round ``r`` sees the same data as the first run's.
        """
        rounds = self.all_rounds(ctx) if before_round is None else before_round
        rows = ctx.rows(self.round_sources(ctx, rounds))
        if not any(r.mask.n_pruned == 0 for r in rows):  # the unrepaired model is stored under AP's label
            rows = [ctx.base(), *rows]
        # only this design's rows: the store may hold others (a comparison's FASP knocks out every head)
        return self.sampler(ctx).training_rows(ctx, rows)

    def guard_predictions(self, ctx: MethodContext) -> list[GuardPrediction]:
        """``--guard-search``: a prediction of each guarded axis (kept in the store; empty when off).

        One forward and one gradient pass per axis on the search half of its validation split,
        counted in the method's cost.
        """
        c = self.options(ctx)
        if not c.guard_search:
            return []
        out = []
        for axis in c.guarded_axes:
            depends = {"axis": axis, "prompts": c.guard_prompt_count}
            stored = ctx.cached("guard_first_order", depends)
            if stored is None and ctx.can_evaluate:
                ctx.log(f"--guard-search: first-order estimates of every head's removal on {axis} (the search half "
                        "of its validation prompts) ...")
                with ctx.timed("guard_first_order"):
                    stored = ctx.guard_removal_estimates(axis)
                ctx.keep("guard_first_order", stored, depends)
            if stored is not None:
                out.append(GuardPrediction(axis, stored, c.guard_margin))
        return out

    # ---- stage 2 ------------------------------------------------------------------------
    def fit(self, ctx: MethodContext, round_: int | None = None) -> Surrogates:
        """Stage 2: fit both surrogates on the validation evaluations (those before ``round_`` when given)."""
        c = self.options(ctx)
        with ctx.timed("fit"):
            rows = self.training_data(ctx, round_)
            model = make_surrogate(c.surrogate, shrink=c.shrink, seed=c.seed)
            data = self.training_set(ctx, rows, c, with_summaries=model.needs_summaries)
            model.fit(data)
            return Surrogates(model.predict_torch, model.metrics(data))

    def training_set(self, ctx: MethodContext, rows: list[StoredEvaluation], c, with_summaries: bool) -> TrainingSet:
        """The surrogates' data from ``rows``: bits, bias, log-perplexity, and (``with_summaries``) the bucket means.

        The bucket means keep every mask's paired shift from the unrepaired model on the
        search prompts, the unrepaired model's own means coming from the anchor's many more
        prompts; the first-order estimates are the prior of each head's shift.
        """
        light = self.sampler(ctx).bias_only_rows(ctx) if with_summaries else []
        measured, rows = len(rows), [*rows, *light]  # knockouts of the bias alone last: their perplexity reads NaN
        bits = np.stack([r.mask.bits for r in rows])
        log_ppl = np.log(np.clip([r.perplexity for r in rows], 1e-6, 1e6))
        bias = np.array([r.bias for r in rows])
        data = TrainingSet(bits=bits, bias=bias, log_ppl=log_ppl, seed=c.seed)
        if not with_summaries:
            return data
        summaries, var, statistic = summaries_of(ctx, rows)
        anchor = self.anchor(ctx)
        base_row = int(np.argmax(bits.sum(1)))  # the unrepaired model: nothing pruned
        if anchor is not None and summaries.shape[1] > 1:
            names = sorted(rows[0].bias_result.buckets)
            summaries = summaries + (np.array([anchor["buckets"][b] for b in names]) - summaries[base_row])
        first = ctx.cached("first_order")
        prior = np.asarray(first["summary"]) if first is not None and summaries.shape[1] > 1 else None
        inside = log_ppl - log_ppl[base_row] <= math.log(1 + c.tau)
        ppl_prior = self.perplexity_prior(ctx)
        ppl_var = log_perplexity_variance(rows[:measured], rows[base_row])
        if ppl_var is not None:
            ppl_var = np.concatenate([ppl_var, np.full(len(light), np.nan)])
        return dataclasses.replace(data, summaries=summaries, statistic=statistic, summary_var=var, prior=prior,
                                   inside=inside, log_ppl_var=ppl_var,
                                   log_ppl_prior=None if ppl_prior is None else np.asarray(ppl_prior["log_perplexity"]))

    # ---- stage 3 ------------------------------------------------------------------------
    def search(self, ctx: MethodContext, surrogates: Surrogates, round_: int | None = None,
               budgets: tuple[float, ...] | None = None,
               gap_per_head: float = 0.0) -> tuple[list[AnnealingResult], tuple[int, int]]:
        """Stage 3: anneal on the surrogates inside the trust region, once per budget of the ladder.

        ``gap_per_head`` (log-perplexity per pruned head, from a calibration) is added to the
        surrogate's perplexity: the search's text under-states the change on fresh text by about
        that much for every head the search picks for being cheap on it.
        """
        budgets = self.ladder if budgets is None else budgets
        c = self.options(ctx)
        policy = ctx.policy
        guards = self.guard_predictions(ctx)  # read back from the store after the first round
        with ctx.timed("search"):
            rows = self.training_data(ctx, round_)
            budget = policy.budget(ctx.base())
            bounds = trust_region(rows, budget, *ctx.bounds)
            if fitting_count(rows, budget)[1]:
                ctx.log(f"no evaluated mask of 2 or more heads met the budget: the trust region (up to {bounds[1]} "
                        "heads) comes from the design's median per-head perplexity cost")
            predict = head_charged(surrogates.predict_torch, gap_per_head, ctx.cells)
            # the budget is relative to the surrogate's own prediction for the unrepaired model, so
            # that a constant offset of the surrogate does not put every state over budget
            base_bias, base_lp = surrogates.predict_torch(torch.ones(1, ctx.cells))
            bias = np.array([r.bias for r in rows])
            scale = max(float(np.std(bias)), 0.1 * abs(float(base_bias[0])), 1e-6)
            free = self.sampler(ctx).free(ctx)
            results = []
            for j, fraction in enumerate(budgets):
                cost = guarded_cost(policy.cost(predict, float(base_lp[0]), scale, tau=fraction * c.tau), guards,
                                    policy.penalty * scale)
                results.append(anneal(cost, ctx.cells, *bounds, chains=c.chains, steps=c.steps,
                                      seed=c.seed + 1000 * (round_ or 0) + 100 * j, t0=c.t0, cooling=c.cooling,
                                      top=max(50, 4 * c.top_k), free=free))
        return results, bounds

    # ---- stage 4 ------------------------------------------------------------------------
    def validate(self, ctx: MethodContext, results: list[AnnealingResult], surrogates: Surrogates,
                 round_: int) -> list[Candidate]:
        """Stage 4: evaluate the best ``top_k`` new candidates on the real model, taken in turn from each budget."""
        top_k = self.options(ctx).top_k
        with ctx.timed("validate"):
            known = {r.mask.key for r in self.training_data(ctx, round_)}
            picked: list[HeadMask] = []
            queues = [[HeadMask(s.reshape(ctx.shape)) for s in res.states] for res in results]
            while len(picked) < top_k and any(queues):
                for q in queues:
                    while q:
                        m = q.pop(0)
                        if m.key not in known and m not in picked:
                            picked.append(m)
                            break
                    if len(picked) == top_k:
                        break
            if not picked:
                return []
            rows = ctx.evaluate(picked, labels.candidates(round_, self.prefix),
                                f"validating candidates, round {round_ + 1}")
            pb, plp = surrogates.predict_torch(torch.as_tensor(np.stack([m.bits for m in picked])))
        return [Candidate(round=round_, n_pruned=m.n_pruned, pruned=[list(p) for p in m.pruned],
                          predicted_bias=float(b), predicted_perplexity=float(math.exp(lp)), bias=r.bias,
                          perplexity=r.perplexity)
                for m, r, b, lp in zip(picked, rows, pb, plp)]

    # ---- calibration ---------------------------------------------------------------------
    def calibrated_budget(self, ctx: MethodContext, before_round: int | None = None,
                          retired: frozenset[str] = frozenset()
                          ) -> tuple[Calibration | None, frozenset[str], frozenset[str], StoredEvaluation | None]:
        """When none of the search's own candidates holds the budget on confirmation data: how to search again.

        The confirmation measures how much the search's perplexity under-states the change on
        fresh text and the margin the choice rule adds. The under-statement is selection: the
        search picks heads whose removal happens to be cheap on the text it measures, so it grows
        with the number of heads picked. The calibration charges it per pruned head (the summed
        gap in log-perplexity over the summed pruned counts of the confirmed candidates) on top
        of the surrogate's perplexity, and searches again within ``tau`` less the margin (in
        log-perplexity, a mean over the confirmed candidates): a smaller mask is then allowed
        more of the search text's perplexity. None when a search candidate is chosen, nothing
        was confirmed or the candidates failed on bias only; ``search_budget`` None when the
        margin alone fills ``tau``. A chosen knockout or design sample does not stop it when a
        search candidate missed the budget on perplexity: that one knockout holds says nothing
        about the search's own budget.

        The selection is the policy's on the rows before ``before_round`` (all when None) less
        the ``retired`` masks; returned with it are the masks this selection confirmed over the
        budget, which the caller retires before searching again, those it confirmed admissible,
        and its choice's search row (None: none; ``--trim-when better`` trims below its bias).
        Retired masks are not shortlisted again: otherwise the first pass's failures, whose
        search-text numbers look best, take every slot of the next shortlist and the calibrated
        search's candidates are never confirmed (evaluation seed 21's store, rerun).
        """
        policy = ctx.policy
        if policy.confirm <= 0:
            return None, frozenset(), frozenset(), None
        base = ctx.base()
        rows = [r for r in self.training_data(ctx, before_round) if r.mask.key not in retired]
        selection = ctx.select(rows, labels.confirm(self.name))
        over = [i for i, x in enumerate(selection.candidates) if x.confirmed_perplexity_change_bound > policy.tau]
        failed = frozenset(selection.shortlist[i].key for i in over)
        admitted = frozenset(m.key for m, x in zip(selection.shortlist, selection.candidates) if x.admissible)
        missed = [selection.candidates[i] for i in over]
        if not missed:
            # nothing confirmed, or the candidates failed on bias: a lower budget will not help
            return None, failed, admitted, selection.chosen
        chosen = selection.chosen
        if chosen is not None and (labels.is_candidate(chosen.source)
                                   or not any(labels.is_candidate(x.source) for x in missed)):
            return None, failed, admitted, chosen  # a search candidate holds, or only design masks missed on perplexity
        gaps = [math.log1p(x.confirmed_perplexity_change) - math.log(x.valid_perplexity / base.perplexity)
                for x in selection.candidates]
        heads = [len(x.pruned) for x in selection.candidates]
        margin = float(np.mean([math.log1p(x.confirmed_perplexity_change_bound)
                                - math.log1p(x.confirmed_perplexity_change) for x in selection.candidates]))
        log_budget = math.log1p(policy.tau) - max(margin, 0.0)
        return Calibration(gap=math.expm1(float(np.mean(gaps))), margin=math.expm1(margin),
                           search_budget=math.expm1(log_budget) if log_budget > 0 else None,
                           confirmed=len(selection.candidates),
                           gap_per_head=max(float(np.sum(gaps)) / max(sum(heads), 1), 0.0),
                           heads=float(np.mean(heads)), retired=len(failed)), failed, admitted, chosen

    # ---- trim ---------------------------------------------------------------------------
    def trim(self, ctx: MethodContext, r: int, missed: frozenset[str], details: SearchDetails,
             gap_per_head: float = 0.0, below: float = math.inf) -> frozenset[str]:
        """Cut over-budget search candidates down to the budget; the keys of the sub-masks confirmed admissible.

        When the calibration ends and none of the search's candidates holds the budget on
        confirmation data (evaluation seeds 30 and 35: every calibrated round's candidates were
        confirmed over it, and the choice fell to one head or none), the search's own best
        masks are still the best guess of *which* heads to prune; they prune too many. The
        ``--trim`` candidates of ``missed`` (search candidates confirmed over the budget) with
        the lowest validation bias (below ``below``: with ``--trim-when better`` the search bias of the
        choice that held) are each cut along a nested path: the surrogates (fitted on
        everything before round ``r``, with the calibration's ``gap_per_head`` charged) restore
        one head at a time, first any whose pruning the surrogate says raises bias, then the
        one that buys the least bias per unit of log-perplexity. The path's sizes are probed
        on the real model: each probe is evaluated on the search half (stored under round
        ``r``'s label) and put through the policy's own selection alone, so it is confirmed
        only when the screen would shortlist it, and admissible by the policy's rule. The
        first probe is the size where the surrogate's perplexity along the path, scaled to the
        candidate's own confirmed change, meets the budget less its bound's margin; then steps
        of 1, 2, 4 ... in the direction the probes point, and bisection once probes on both
        sides bracket the largest admissible size.
        """
        c = self.options(ctx)
        policy = ctx.policy
        source, confirm_source = labels.candidates(r, self.prefix), labels.confirm(self.name)
        rows = [x for x in self.training_data(ctx, r) if x.mask.key in missed and labels.is_candidate(x.source)
                and x.bias < below]
        if not rows:
            return frozenset()
        surrogates = self.fit(ctx, r)
        predict = head_charged(surrogates.predict_torch, gap_per_head, ctx.cells)
        admitted: set[str] = set()
        for start in sorted(rows, key=lambda x: x.bias)[: c.trim]:
            own = ctx.select([start], confirm_source)  # read back: it was confirmed over the budget
            if not own.candidates:
                continue
            x = own.candidates[0]
            path, predicted = removal_path(start.mask, predict)  # path[i]: i + 1 heads pruned, i < k - 1
            k = start.mask.n_pruned
            guess = trim_guess(predicted, x.confirmed_perplexity_change, x.confirmed_perplexity_change_bound,
                               policy.tau)
            record = Trim(heads=k, valid_bias=start.bias, confirmed_perplexity_change=x.confirmed_perplexity_change,
                          confirmed_perplexity_change_bound=x.confirmed_perplexity_change_bound, guess=guess)
            # sizes: lo is admissible (0: nothing), hi is not; from the guess, steps of 1, 2, 4 ... in the
            # direction the probes point, then bisection once probes on both sides bracket the answer
            lo, hi, size, step, last = 0, k, guess, 1, None
            with ctx.timed("trim"):
                while hi - lo > 1:
                    size = min(max(size, lo + 1), hi - 1)
                    mask = path[size - 1]
                    row = ctx.evaluate([mask], source, f"trimming a {k}-head candidate: {size} heads")[0]
                    sel = ctx.select([row], confirm_source)
                    probe = TrimProbe(heads=size, valid_bias=row.bias, valid_perplexity=row.perplexity)
                    if sel.candidates:
                        y = sel.candidates[0]
                        probe.confirmed_perplexity_change = y.confirmed_perplexity_change
                        probe.confirmed_perplexity_change_bound = y.confirmed_perplexity_change_bound
                        probe.admissible = y.admissible
                    record.probes.append(probe)
                    if probe.admissible:
                        admitted.add(mask.key)
                        lo = record.kept = size
                    else:
                        hi = size
                    if last is not None and last != probe.admissible:
                        step = 0  # bracketed
                    last = probe.admissible
                    if step:
                        size, step = (lo + step if probe.admissible else hi - step), 2 * step
                    else:
                        size = (lo + hi) // 2
            details.trim.append(record)
            ctx.log(f"trim: a {k}-head candidate confirmed at {100 * x.confirmed_perplexity_change:+.1f}% (bound "
                    f"{100 * x.confirmed_perplexity_change_bound:+.1f}%) cut to "
                    + (f"{record.kept} heads" if record.kept else "nothing admissible")
                    + f" in {len(record.probes)} probe(s), the first at {guess} heads")
        return frozenset(admitted)

    # ---- the method ---------------------------------------------------------------------
    def round(self, ctx: MethodContext, r: int, details: SearchDetails, ladder: tuple[float, ...] | None = None,
              gap_per_head: float = 0.0) -> None:
        """One round: fit, anneal at the ``ladder`` of budgets (fractions of tau; default the method's), validate.

        ``gap_per_head``: a calibration's charge per pruned head (see :meth:`search`).
        """
        ladder = self.ladder if ladder is None else ladder
        c = self.options(ctx)
        surrogates = self.fit(ctx, r)
        details.surrogates.append({"round": r, **surrogates.metrics})
        ctx.log(f"round {r + 1}: surrogates on {surrogates.metrics['samples']} masks; " + describe_metrics(
            surrogates.metrics))
        results, bounds = self.search(ctx, surrogates, r, ladder, gap_per_head)
        for fraction, res in zip(ladder, results):
            details.annealing.append(AnnealingSummary(
                round=r, pruned_bounds=list(bounds), t0=res.t0, states_scored=res.states_scored,
                seconds=res.seconds, states_per_second=res.states_per_second, best_cost=float(res.costs[0]),
                trace=res.trace, budget=fraction * c.tau))
        ctx.log(f"round {r + 1}: annealed {sum(x.states_scored for x in results):,} states with {bounds[0]}-"
                f"{bounds[1]} heads pruned at budgets " + ", ".join(f"{100 * f * c.tau:+.1f}%" for f in ladder)
                + (f" (search-text perplexity plus {100 * gap_per_head:.2f}% per pruned head)" if gap_per_head else ""))
        details.candidates.extend(self.validate(ctx, results, surrogates, r))

    def propose(self, ctx: MethodContext) -> Proposal:
        c = self.options(ctx)
        self.design(ctx)
        details = SearchDetails()
        for r in range(c.rounds):
            self.round(ctx, r, details)
        # each calibration's selection sees the rounds before it, so a rerun repeats the first run's (confirmations
        # are read back from the store); the masks it confirmed over the budget are retired before the next round
        retired: frozenset[str] = frozenset()
        kept: frozenset[str] = frozenset()  # confirmed admissible by any of the calibration's selections
        missed: frozenset[str] = frozenset()  # search candidates over the budget while none held it (--trim)
        gap_per_head = 0.0
        # with --trim, one more selection after the last calibration round says whether its candidates held
        below = math.inf  # --trim-when better: only candidates below the search bias of a choice that held
        for j in range(c.calibrate + (1 if c.trim > 0 else 0)):
            cal, failed, admitted, chosen = self.calibrated_budget(ctx, c.rounds + j, retired)
            kept |= admitted
            if cal is None:
                missed = frozenset()
                if c.trim_when == "better":  # a search candidate held: its selection's over-budget masks
                    missed = retired | failed
                    below = chosen.bias if chosen is not None else math.inf
                break
            missed = retired | failed
            if j == c.calibrate:
                break  # the calibration rounds are spent: what is left is the trim
            details.calibration.append(cal)
            said = (f"calibration: search perplexity under-states the confirmed change by {100 * cal.gap:.1f}% "
                    f"({100 * cal.gap_per_head:.2f}% per pruned head over {cal.heads:.1f} heads on average) and the "
                    f"choice rule adds {100 * cal.margin:.1f}%")
            if cal.search_budget is None:
                ctx.log(said + ": no room left within the budget")
                break
            ctx.log(said + f"; searching again within {100 * cal.search_budget:+.2f}% with "
                    f"{100 * cal.gap_per_head:.2f}% charged per pruned head")
            retired |= failed
            gap_per_head = cal.gap_per_head
            scale = cal.search_budget / c.tau
            self.round(ctx, c.rounds + j, details, tuple(f * scale for f in self.ladder), cal.gap_per_head)
        if c.trim > 0 and missed:
            kept |= self.trim(ctx, c.rounds + c.calibrate, missed, details, gap_per_head, below)
        rows = self.training_data(ctx)
        knocked = sum(r.source == labels.KNOCKOUT for r in rows)
        # the first-order pass is this method's cost where it uses it: the boundary sampler's screen, the additive
        # surrogate's prior (ap_paper's random samples and MLP surrogates use neither)
        uses_first = (c.sampler == "boundary" and knocked < ctx.n_total) or c.surrogate == "additive"
        first = ctx.cached("first_order") if uses_first else None
        notes = (f"{len(rows)} validation evaluations (" + self.sampler(ctx).describe(ctx, rows)
                 + f"{c.samples} samples, {c.rounds} rounds x {c.top_k} candidates"
                 + (f", {len(details.calibration)} calibration(s)" if details.calibration else "") + ")")
        extras = {"first-order pass": (0, first["seconds"])} if first else {}
        anchor = self.anchor(ctx)
        if anchor:
            extras["anchor"] = (1, anchor["seconds"])
            notes += f"; anchored on the unrepaired model's means over {anchor['prompts']} search prompts"
        prior = self.perplexity_prior(ctx)
        if prior:
            extras["perplexity prior"] = (0, prior["seconds"])
            notes += f"; perplexity effects shrunk toward first-order estimates on {c.ppl_prior_tokens} search tokens"
        for g in self.guard_predictions(ctx):
            extras[f"{g.axis} estimates"] = (1, g.seconds)
            notes += (f"; the search kept {g.axis}'s bias (first-order estimates on {g.prompts} of its "
                      f"prompts) within {100 * c.guard_margin:g}% of its unrepaired {g.base:.3f}")
        if retired:
            notes += f"; {len(retired)} confirmed over the budget before a calibration round, not shortlisted again"
        light = self.sampler(ctx).bias_only_rows(ctx)  # knockouts of the bias alone: charged, never chosen
        charged = [*rows, *light]
        evaluations, seconds = charged_totals(charged, extras)
        stage_of: dict[str, str] = {}  # each mask under the first of this method's own labels that holds it
        for source in self.round_sources(ctx, self.all_rounds(ctx)):
            for r in ctx.rows([source]):
                stage_of.setdefault(r.mask.key, labels.stage(source))
        if kept and (details.calibration or details.trim):  # without a calibration round nothing needed keeping
            notes += (f"; {len(kept)} confirmed within the budget by the calibration's selections, kept among the "
                      "candidates of the choice")
        for t in details.trim:
            notes += (f"; trimmed a {t.heads}-head candidate over the budget to "
                      + (f"{t.kept} heads" if t.kept else "nothing admissible") + f" in {len(t.probes)} probe(s)")
        return Proposal(rows, evaluations, seconds, notes, details, retired, extras, stage_of=stage_of, kept=kept,
                        charged=charged if light else None)


def head_charged(predict, per_head: float, cells: int):
    """``predict`` with ``per_head`` log-perplexity added for every pruned head (``predict`` itself when 0)."""
    if not per_head:
        return predict

    def charged(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, lp = predict(states)
        return b, lp + per_head * (cells - states.sum(1))

    return charged


def removal_path(mask: HeadMask, predict) -> tuple[list[HeadMask], list[float]]:
    """Nested sub-masks of ``mask`` (``[i]`` prunes ``i + 1`` heads), restoring one pruned head at a time.

    At each step the head restored is, by ``predict`` (states -> bias, log-perplexity), one
    whose pruning raises bias (the most such first), else the one that buys the least bias
    per unit of log-perplexity it costs. Also returned: the predicted log-perplexity change
    from the unrepaired model at every size, ``mask``'s own last.
    """
    state = torch.as_tensor(mask.bits).clone()
    shape = mask.shape
    _, base_lp = predict(torch.ones(1, state.numel()))
    path: list[HeadMask] = []
    lps: list[float] = []
    while True:
        pruned = torch.nonzero(state == 0).flatten()
        b, lp = predict(state[None])
        lps.append(float(lp[0] - base_lp[0]))
        if len(pruned) <= 1:
            break
        trial = state.repeat(len(pruned), 1)
        trial[torch.arange(len(pruned)), pruned] = 1
        tb, tlp = predict(trial)
        raise_bias = tb - b[0]  # what restoring each head costs in bias
        saves = lp[0] - tlp  # and saves in log-perplexity
        if bool((raise_bias <= 0).any()):
            pick = int(torch.argmin(raise_bias))
        else:
            pick = int(torch.argmin(raise_bias / saves.clamp_min(1e-9)))
        state[pruned[pick]] = 1
        path.append(HeadMask(state.numpy().reshape(shape).copy()))
    path.reverse()
    lps.reverse()
    return path, lps


def trim_guess(predicted: list[float], change: float, bound: float, tau: float) -> int:
    """The first size a trim probes: the largest whose predicted change meets the budget less the bound's margin.

    ``predicted[i]``: the surrogate's log-perplexity change at ``i + 1`` heads along the path
    (the candidate itself last), scaled so that the candidate's own reads its confirmed
    ``change``; ``bound - change`` (in log terms) is the rule's margin. The middle of the path
    when the surrogate predicts no cost for the candidate.
    """
    k = len(predicted)
    full, measured = predicted[-1], math.log1p(change)
    if full <= 0 or measured <= 0:
        return max(1, k // 2)
    room = math.log1p(tau) - (math.log1p(bound) - measured)
    fits = [i + 1 for i, p in enumerate(predicted[:-1]) if measured * p / full <= room]
    return max(fits) if fits else 1


def describe_metrics(metrics: dict) -> str:
    """One line of held-out surrogate accuracy."""
    cv = metrics.get("cv", {})
    parts = []
    for target in ("bias", "log_perplexity"):
        for kind, m in cv.get(target, {}).items():
            parts.append(f"{target} {kind} Spearman {m['spearman']:.2f}")
    return ", ".join(parts) or "no held-out metrics (too few multi-head masks)"


def log_perplexity_variance(rows: list[StoredEvaluation], base: StoredEvaluation) -> np.ndarray | None:
    """``[M]`` sampling variance of each row's log-perplexity change from ``base``, over the text's windows.

    The paired per-window differences (same windows, same tokens each): their variance over
    the windows, divided by the window count. None when the rows hold no per-window values.
    """
    windows = len(base.perplexity_result.per_window) if base.perplexity_result is not None else 0
    if windows < 2 or any(r.perplexity_result is None or len(r.perplexity_result.per_window) != windows
                          for r in rows):
        return None
    return np.array([window_differences(r, base).var(ddof=1) / windows for r in rows])
