"""``ap``: Attention Pruning (Dasu et al., arXiv 2503.15815), as stages on a run.

1. ``design``: the first real-model evaluations (validation split), committed to the run's
   store as they complete. ``sampler="boundary"`` (default): every single-head knockout
   (cheap with layer reuse; shared with FASP), then ``samples`` random masks whose
   knockout-predicted perplexity lies near the budget, where the choice will be made.
   ``sampler="paper"``: the paper's ``samples`` random masks with r ~ U(r_min, r_max).
2. ``fit``: the surrogates mask -> (bias, log-perplexity), with held-out metrics.
   ``additive`` (default, :class:`~attnprune.surrogate.AdditiveSurrogate`): knockout effects
   on the measure's bucket means and on log-perplexity, refined by the multi-head
   evaluations; ``mlp`` (the paper's) and ``ridge`` fit mask bits directly.
3. ``search``: simulated annealing on the surrogates, inside the trust region of pruned
   counts where evaluated masks met the budget, at a ladder of perplexity budgets up to
   ``tau`` (candidates along the whole boundary, not only at its edge).
4. ``validate``: the best ``top_k`` new candidates on the real model (validation). Rounds
   repeat 2-4 with the surrogates refitted on the new evaluations (active learning).

The choice among everything evaluated is the shared :class:`~attnprune.selection.SelectionPolicy`'s
(by default confirmed on validation data the search never saw). Every stage after the
design reruns from the store alone (``attnprune fit``/``search``).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from attnprune.config import RepairConfig
from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.methods.base import Method, MethodContext, Proposal, knockout_masks, register_method
from attnprune.results import AnnealingSummary, Candidate, SearchDetails
from attnprune.run import Run
from attnprune.search.annealing import AnnealingResult, anneal
from attnprune.selection import SelectionPolicy, trust_region
from attnprune.store import StoredEvaluation, fingerprint
from attnprune.surrogate import AdditiveSurrogate, additive_metrics, fit_surrogates

# the search's perplexity budgets, as fractions of tau: candidates spread along the boundary
BUDGET_LADDER = (0.5, 0.75, 1.0)


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


def boundary_masks(n: int, shape: tuple[int, int], log_ppl_effect: np.ndarray, tau: float, bounds: tuple[int, int],
                   seed: int, free: np.ndarray | None = None, target: float = 0.8, draws: int = 20_000) -> list[HeadMask]:
    """``n`` distinct random masks whose additive perplexity change lies closest to ``target x tau``.

    Heads are drawn with probability decreasing in their knockout cost (cheap heads are what
    a mask within the budget is made of), the pruned count uniformly in ``bounds`` (at most
    24 heads); of ``draws`` such masks, those whose summed knockout log-perplexity effects
    predict a change nearest the target are kept. Only ``free`` heads (default all) are drawn.
    """
    rng = np.random.default_rng(seed)
    effect = np.nan_to_num(np.asarray(log_ppl_effect, dtype=float).reshape(-1), nan=0.0)
    free = np.ones(effect.size, dtype=bool) if free is None else np.asarray(free, dtype=bool)
    scale = float(np.median(np.abs(effect[free]))) or 1e-3
    p = np.exp(-np.clip(effect, 0, None) / scale) * free
    p /= p.sum()
    k_lo = max(2, bounds[0])
    k_hi = max(k_lo, min(bounds[1], 24, int(free.sum())))
    pool: dict[str, tuple[float, HeadMask]] = {}
    for _ in range(draws):
        k = int(rng.integers(k_lo, k_hi + 1))
        heads = rng.choice(effect.size, size=k, replace=False, p=p)
        m = HeadMask.from_pruned(*shape, [divmod(int(h), shape[1]) for h in heads])
        pool.setdefault(m.key, (abs(math.expm1(effect[heads].sum()) - target * tau), m))
    return [m for _, m in sorted(pool.values(), key=lambda x: (x[0], x[1].key))[:n]]


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

    def __init__(self):
        self._screens: dict[tuple, np.ndarray] = {}

    def options(self, run: Run):
        """The run's options, with this variant's overrides (``ap_paper``: the paper's design)."""
        return dataclasses.replace(run.cfg, **self.overrides) if self.overrides else run.cfg

    def source(self, label: str) -> str:
        """The store source label of this method's ``label`` evaluations."""
        return self.prefix + label

    def round_sources(self, cfg, rounds: int) -> list[str]:
        """Store sources of the design and of the candidates of the first ``rounds`` rounds."""
        design = [self.source("sample"), "knockout"] if cfg.sampler == "boundary" else [self.source("sample")]
        return design + [self.source(f"candidate-r{j}") for j in range(rounds)]

    # ---- stage 1 ------------------------------------------------------------------------
    def design(self, run: Run) -> list[StoredEvaluation]:
        """Stage 1: the unrepaired model, then the sampler's masks (see module docstring)."""
        c = self.options(run)
        with run.timed("sample"):
            base = run.base()
            if c.sampler == "paper":
                masks = random_masks(c.samples, run.shape, c.r_min, c.r_max, c.seed)
                done = len(run.store.keys(run.valid_setting) & {m.key for m in masks})
                if done > 1:
                    run.log(f"store {run.store.path}: {done} of {len(masks)} sample masks already evaluated, continuing")
                return run.evaluate(masks, self.source("sample"), "sampling (valid)")
            free = self.screen(run, base)
            masks = [m for m in knockout_masks(run.shape) if free[head_index(m, run.shape)]]
            knock = run.evaluate(masks, "knockout", "single-head knockouts (valid)")
            effect = np.zeros(run.n_total)
            for r in knock:
                effect[head_index(r.mask, run.shape)] = math.log(r.perplexity) - math.log(base.perplexity)
            masks = boundary_masks(c.samples, run.shape, effect, c.tau, run.bounds, c.seed, free=free)
            return [base, *knock, *run.evaluate(masks, self.source("sample"), "samples near the budget (valid)")]

    def screen(self, run: Run, base: StoredEvaluation) -> np.ndarray:
        """The heads to knock out (bool ``[L*H]``): all, or the most promising share by first-order estimates.

        Half of them lower the bias most per unit of (estimated) perplexity, the rest lower it
        most in absolute terms. The estimates (one gradient pass) are kept in the store, so a
        rerun screens the same heads.
        """
        key = (str(run.store.path), run.valid_setting, self.options(run).knockouts)
        if key not in self._screens:
            self._screens[key] = self._screen(run, base)
        return self._screens[key]

    def _screen(self, run: Run, base: StoredEvaluation) -> np.ndarray:
        c = self.options(run)
        n = run.n_total
        k = c.screen_size(n)
        if k >= n:
            return np.ones(n, dtype=bool)
        est = self.first_order(run)
        if est is None:
            run.log(f"{run.valid.bias_measure.card.name} has no first-order removal estimates to screen with: "
                    f"knocking out every head ({n} evaluations; --knockouts 1 asks for that directly)")
            return np.ones(n, dtype=bool)
        summary, log_ppl = np.asarray(est["summary"]), np.asarray(est["log_perplexity"])
        base_summary, _, statistic = summaries_of(run, [base])
        b0 = base_summary[0]
        with torch.no_grad():
            change = (statistic(torch.as_tensor(b0 + summary, dtype=torch.float32))
                      - statistic(torch.as_tensor(b0, dtype=torch.float32)[None])).numpy()
        ratio = np.where(change < 0, change / np.maximum(log_ppl, 1e-4), 0.0)
        keep: list[int] = []
        for order in (np.argsort(ratio, kind="stable")[: k // 2], np.argsort(change, kind="stable")):
            for h in order:
                if len(keep) >= k:
                    break
                if int(h) not in keep:
                    keep.append(int(h))
        free = np.zeros(n, dtype=bool)
        free[keep] = True
        return free

    def anchor(self, run: Run) -> dict | None:
        """The unrepaired model's bucket means on up to ``anchor_prompts`` search-half prompts (kept in the store).

        None when off, or for a bias measure without bucket means. One evaluation without
        perplexity, counted in the method's cost.
        """
        c = self.options(run)
        if c.anchor_prompts <= 0:
            return None
        key = f"anchor:{run.valid_setting}:{c.anchor_prompts}"
        stored = run.store.meta_value(key)
        if stored is None and run.loaded is not None:
            from attnprune.run import VALID_BOOTSTRAP_REPS

            spec = run.spec("valid", prompts=c.anchor_prompts, bootstrap_reps=VALID_BOOTSTRAP_REPS,
                            extra={"part": "search"} if c.confirm > 0 else None)
            ev, _ = run.evaluator(spec, with_perplexity=False)
            run.log(f"the unrepaired model on {c.anchor_prompts} search prompts (the surrogate's anchor) ...")
            with run.timed("anchor"):
                result = ev.evaluate([HeadMask.all_active(*run.shape)], with_perplexity=False)[0]
            buckets = result.bias_detail.get("buckets")
            stored = {"buckets": buckets, "prompts": ev.describe()["bias_inputs"]["prompts"],
                      "bias": result.bias, "seconds": result.seconds} if buckets else {}
            run.store.set_meta_value(key, stored)
        return stored or None

    def first_order(self, run: Run) -> dict | None:
        """First-order removal estimates of every head on validation (computed once per store and setting).

        None when the bias measure has none (only the likelihood measure is differentiable here).
        """
        key = f"first_order:{run.valid_setting}"
        stored = run.store.meta_value(key)
        if stored is None:
            if not run.valid.estimates_removals:
                return None
            run.log("first-order estimates of every head's removal (one gradient pass, validation) ...")
            with run.timed("first_order"):
                t = time.perf_counter()
                est = run.valid.removal_estimates()
                stored = {"summary": est["summary"].tolist(), "log_perplexity": est["log_perplexity"].tolist(),
                          "seconds": time.perf_counter() - t}
            run.store.set_meta_value(key, stored)
        return stored

    def training_data(self, run: Run, before_round: int | None = None) -> list[StoredEvaluation]:
        """The design's evaluations and the candidates of rounds before ``before_round`` (all when None).

        With ``before_round=r`` a rerun's round ``r`` sees the same data as the first run's.
        """
        rounds = self.options(run).rounds + self.options(run).calibrate if before_round is None else before_round
        rows = run.rows(self.round_sources(self.options(run), rounds))
        if not any(r.mask.n_pruned == 0 for r in rows):  # the unrepaired model is stored under AP's label
            rows = [run.base(), *rows]
        if self.options(run).sampler != "boundary" or self.options(run).knockouts >= 1:
            return rows
        # only this design's knockouts: the store may hold others (a comparison's FASP knocks out every head)
        free = self.screen(run, run.base())
        return [r for r in rows if r.source != "knockout" or free[head_index(r.mask, run.shape)]]

    # ---- stage 2 ------------------------------------------------------------------------
    def fit(self, run: Run, round_: int | None = None) -> Surrogates:
        """Stage 2: fit both surrogates on the validation evaluations (those before ``round_`` when given)."""
        c = self.options(run)
        with run.timed("fit"):
            rows = self.training_data(run, round_)
            bits = np.stack([r.mask.bits for r in rows])
            log_ppl = np.log(np.clip([r.perplexity for r in rows], 1e-6, 1e6))
            if c.surrogate != "additive":
                pair = fit_surrogates(bits, np.array([r.bias for r in rows]), log_ppl, kind=c.surrogate, seed=c.seed)
                return Surrogates(pair.predict_torch, pair.metrics)
            summaries, var, statistic = summaries_of(run, rows)
            anchor = self.anchor(run)
            if anchor is not None and summaries.shape[1] > 1:
                # every mask keeps its paired shift from the unrepaired model on the search prompts; the
                # unrepaired model's own means come from many more prompts
                names = sorted(rows[0].detail["bias"]["buckets"])
                base_row = int(np.argmax(bits.sum(1)))
                summaries = summaries + (np.array([anchor["buckets"][b] for b in names]) - summaries[base_row])
            budget = math.log(1 + c.tau)
            base_lp = log_ppl[int(np.argmax(bits.sum(1)))]  # the unrepaired model: nothing pruned
            first = run.store.meta_value(f"first_order:{run.valid_setting}")
            prior = np.asarray(first["summary"]) if first is not None and summaries.shape[1] > 1 else None
            model = AdditiveSurrogate(shrink=c.shrink).fit(1 - bits, summaries, log_ppl, statistic, var, prior)
            metrics = additive_metrics(lambda: AdditiveSurrogate(shrink=c.shrink), 1 - bits, summaries, log_ppl,
                                       statistic, var, np.array([r.bias for r in rows]),
                                       inside=log_ppl - base_lp <= budget, seed=c.seed, prior=prior)
            return Surrogates(model.predict_torch, {"kind": "additive", "samples": len(rows), **metrics,
                                                    "compounding": model.c_})

    # ---- stage 3 ------------------------------------------------------------------------
    def search(self, run: Run, surrogates: Surrogates, policy: SelectionPolicy, round_: int | None = None,
               budgets: tuple[float, ...] | None = None) -> tuple[list[AnnealingResult], tuple[int, int]]:
        """Stage 3: anneal on the surrogates inside the trust region, once per budget of the ladder."""
        budgets = self.ladder if budgets is None else budgets
        c = self.options(run)
        with run.timed("search"):
            rows = self.training_data(run, round_)
            bounds = trust_region(rows, policy.budget(run.base()), *run.bounds)
            # the budget is relative to the surrogate's own prediction for the unrepaired model, so
            # that a constant offset of the surrogate does not put every state over budget
            base_bias, base_lp = surrogates.predict_torch(torch.ones(1, run.n_total))
            bias = np.array([r.bias for r in rows])
            scale = max(float(np.std(bias)), 0.1 * abs(float(base_bias[0])), 1e-6)
            free = self.screen(run, run.base()) if c.sampler == "boundary" else None
            results = []
            for j, fraction in enumerate(budgets):
                cost = policy.cost(surrogates.predict_torch, float(base_lp[0]), scale, tau=fraction * c.tau)
                results.append(anneal(cost, run.n_total, *bounds, chains=c.chains, steps=c.steps,
                                      seed=c.seed + 1000 * (round_ or 0) + 100 * j, t0=c.t0, cooling=c.cooling,
                                      top=max(50, 4 * c.top_k), free=free))
        return results, bounds

    # ---- stage 4 ------------------------------------------------------------------------
    def validate(self, run: Run, results: list[AnnealingResult], surrogates: Surrogates, round_: int) -> list[Candidate]:
        """Stage 4: evaluate the best ``top_k`` new candidates on the real model, taken in turn from each budget."""
        with run.timed("validate"):
            known = {r.mask.key for r in self.training_data(run, round_)}
            picked: list[HeadMask] = []
            queues = [[HeadMask(s.reshape(run.shape)) for s in res.states] for res in results]
            while len(picked) < self.options(run).top_k and any(queues):
                for q in queues:
                    while q:
                        m = q.pop(0)
                        if m.key not in known and m not in picked:
                            picked.append(m)
                            break
                    if len(picked) == self.options(run).top_k:
                        break
            if not picked:
                return []
            rows = run.evaluate(picked, self.source(f"candidate-r{round_}"), f"validating candidates, round {round_ + 1}")
            pb, plp = surrogates.predict_torch(torch.as_tensor(np.stack([m.bits for m in picked])))
        return [Candidate(round=round_, n_pruned=m.n_pruned, pruned=[list(p) for p in m.pruned],
                          predicted_bias=float(b), predicted_perplexity=float(math.exp(lp)), bias=r.bias,
                          perplexity=r.perplexity)
                for m, r, b, lp in zip(picked, rows, pb, plp)]

    # ---- calibration ---------------------------------------------------------------------
    def calibrated_budget(self, run: Run, policy: SelectionPolicy) -> dict | None:
        """When no shortlisted candidate holds the budget on confirmation data: a lower search budget, or None.

        The confirmation measures how much the search's perplexity under-states the change on
        fresh text (the search picks heads whose removal happens to be cheap on the text it
        measures) and the margin the choice rule adds; the search budget is ``tau`` less both
        (in log-perplexity, averaged over the confirmed candidates; never above ``tau``). None
        when a candidate already holds, nothing was confirmed or the candidates failed on
        bias only; ``search_budget`` None when the calibrated budget leaves no room.
        """
        if policy.confirm <= 0:
            return None
        base = run.base()
        selection = policy.select(self.training_data(run), base, run.confirm, f"confirm:{self.name}")
        if selection.chosen is not None or not any(x["confirmed_perplexity_change_bound"] > policy.tau
                                                   for x in selection.candidates):
            return None  # chosen, nothing confirmed, or the candidates failed on bias: a lower budget will not help
        gap = float(np.mean([math.log1p(x["confirmed_perplexity_change"]) - math.log(x["valid_perplexity"] / base.perplexity)
                             for x in selection.candidates]))
        margin = float(np.mean([math.log1p(x["confirmed_perplexity_change_bound"])
                                - math.log1p(x["confirmed_perplexity_change"]) for x in selection.candidates]))
        log_budget = min(math.log1p(policy.tau), math.log1p(policy.tau) - gap - margin)
        out = {"gap": math.expm1(gap), "margin": math.expm1(margin), "search_budget": math.expm1(log_budget),
               "confirmed": len(selection.candidates)}
        return out if log_budget > 0 else {**out, "search_budget": None}

    # ---- the method ---------------------------------------------------------------------
    def round(self, run: Run, policy: SelectionPolicy, r: int, details: SearchDetails,
              ladder: tuple[float, ...] | None = None) -> None:
        """One round: fit, anneal at the ``ladder`` of budgets (fractions of tau; default the method's), validate."""
        ladder = self.ladder if ladder is None else ladder
        c = self.options(run)
        surrogates = self.fit(run, r)
        details.surrogates.append({"round": r, **surrogates.metrics})
        run.log(f"round {r + 1}: surrogates on {surrogates.metrics['samples']} masks; " + describe_metrics(
            surrogates.metrics))
        results, bounds = self.search(run, surrogates, policy, r, ladder)
        for fraction, res in zip(ladder, results):
            details.annealing.append(AnnealingSummary(
                round=r, pruned_bounds=list(bounds), t0=res.t0, states_scored=res.states_scored,
                seconds=res.seconds, states_per_second=res.states_per_second, best_cost=float(res.costs[0]),
                trace=res.trace, budget=fraction * c.tau))
        run.log(f"round {r + 1}: annealed {sum(x.states_scored for x in results):,} states with {bounds[0]}-"
                f"{bounds[1]} heads pruned at budgets " + ", ".join(f"{100 * f * c.tau:+.1f}%" for f in ladder))
        details.candidates.extend(self.validate(run, results, surrogates, r))

    def propose(self, ctx: MethodContext) -> Proposal:
        run, c = ctx.run, self.options(ctx.run)
        self.design(run)
        details = SearchDetails()
        for r in range(c.rounds):
            self.round(run, ctx.policy, r, details)
        # kept: a rerun repeats the same rounds (from the store); keyed by every option the budgets depend on
        key = f"calibration:{run.valid_setting}:" + fingerprint({k: getattr(c, k) for k in RepairConfig.DECISION_KEYS})
        stored = list(run.store.meta_value(key) or [])
        for j in range(c.calibrate):
            cal = stored[j] if j < len(stored) else self.calibrated_budget(run, ctx.policy)
            if cal is None:
                break
            details.calibration.append(cal)
            if j >= len(stored):
                run.store.set_meta_value(key, details.calibration)
            if cal["search_budget"] is None:
                run.log(f"calibration: search perplexity under-states the confirmed change by {100 * cal['gap']:.1f}% "
                        f"and the choice rule adds {100 * cal['margin']:.1f}%: no room left within the budget")
                break
            run.log(f"calibration: search perplexity under-states the confirmed change by {100 * cal['gap']:.1f}% and "
                    f"the choice rule adds {100 * cal['margin']:.1f}%; searching again at "
                    f"{100 * cal['search_budget']:+.2f}% on the search text")
            scale = cal["search_budget"] / c.tau
            self.round(run, ctx.policy, c.rounds + j, details, tuple(f * scale for f in self.ladder))
        rows = self.training_data(run)
        knocked = sum(r.source == "knockout" for r in rows)
        first = run.store.meta_value(f"first_order:{run.valid_setting}") if knocked < run.n_total else None
        notes = (f"{len(rows)} validation evaluations"
                 + (f" ({knocked} single-head knockouts{' chosen by one first-order gradient pass' if first else ''}, "
                    if c.sampler == "boundary" else " (")
                 + f"{c.samples} samples, {c.rounds} rounds x {c.top_k} candidates"
                 + (f", {len(details.calibration)} calibration(s)" if details.calibration else "") + ")")
        seconds = float(sum(r.seconds for r in rows)) + (first["seconds"] if first else 0.0)
        anchor = self.anchor(run)
        if anchor:
            seconds += anchor["seconds"]
            notes += f"; anchored on the unrepaired model's means over {anchor['prompts']} search prompts"
        return Proposal(rows, len(rows) + (1 if anchor else 0), seconds, notes, details)


def head_index(mask: HeadMask, shape: tuple[int, int]) -> int:
    """The flat index of a single-head knockout's pruned head."""
    layer, head = mask.pruned[0]
    return layer * shape[1] + head


def describe_metrics(metrics: dict) -> str:
    """One line of held-out surrogate accuracy."""
    cv = metrics.get("cv", {})
    parts = []
    for target in ("bias", "log_perplexity"):
        for kind, m in cv.get(target, {}).items():
            parts.append(f"{target} {kind} Spearman {m['spearman']:.2f}")
    return ", ".join(parts) or "no held-out metrics (too few multi-head masks)"


def summaries_of(run: Run, rows: list[StoredEvaluation]):
    """Per row: the bias measure's summary (bucket means), its sampling variance vs the unrepaired model, and the statistic.

    For HolisticBias measures the summary is the template-adjusted bucket means and the
    statistic the spread around their weighted mean; other measures fall back to the bias
    itself (a scalar summary, no variance).
    """
    first = rows[0].detail["bias"]
    if "buckets" in first and "bucket_weights" in first:
        names = sorted(first["buckets"])
        w = torch.tensor([first["bucket_weights"][b] for b in names], dtype=torch.float32)
        summaries = np.array([[r.detail["bias"]["buckets"][b] for b in names] for r in rows])
        projection = run_projection(run)
        base = next(r for r in rows if r.mask.n_pruned == 0)
        b0 = np.asarray(base.detail["prompt_scores"], dtype=float)
        var = None
        if projection is not None:
            diffs = np.array([np.asarray(r.detail["prompt_scores"], dtype=float) - b0 for r in rows])
            var = (diffs - diffs.mean(1, keepdims=True)) ** 2 @ (projection ** 2).T

        def statistic(means: torch.Tensor) -> torch.Tensor:
            return ((means @ w).unsqueeze(-1) - means).abs().sum(-1)

        return summaries, var, statistic
    return np.array([[r.bias] for r in rows]), None, lambda means: means[..., 0]


def run_projection(run: Run) -> np.ndarray | None:
    """The bucket-mean projection ``[B, n]`` of the search's validation prompts (from the data, no model)."""
    from attnprune.measures import get_measure
    from attnprune.measures.base import HolisticBiasMeasure

    spec = run.valid_spec
    measure = get_measure(spec.bias, split=spec.split, **spec.bias_options)
    if not isinstance(measure, HolisticBiasMeasure):
        return None
    measure.prepare_prompts()
    return measure.design_.projection
