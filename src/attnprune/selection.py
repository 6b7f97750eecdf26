"""The selection policy every method shares: the perplexity budget, the search cost, the choice.

- :class:`Budget`: at most ``(1 + tau)`` x the unrepaired model's validation perplexity.
- :func:`budget_cost`: the cost the annealer minimises, on a surrogate (AP) or on the real
  model (``direct_sa``): bias + a penalty for log-perplexity above the budget.
- :func:`trust_region`: the largest pruned count worth searching, from where evaluated
  masks met the budget.
- :meth:`SelectionPolicy.select`: the choice among a method's evaluated candidates, by
  default confirmed on validation data the search never saw (the winner's curse: the
  lowest of many noisy values is partly luck).

One policy for AP and every baseline, so that a comparison compares the methods'
candidates, not their selection rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from attnprune import labels
from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.results import Choice, ConfirmedCandidate, ConfirmedValues, GuardVerdict
from attnprune.search.annealing import Cost
from attnprune.store import StoredEvaluation

# states [chains, N] (1 = active) -> (bias [chains], log-perplexity [chains])
Predict = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Budget:
    """The perplexity budget: ``(1 + tau) x base_perplexity``."""

    base_perplexity: float
    tau: float

    @property
    def limit(self) -> float:
        """The largest admissible perplexity."""
        return self.base_perplexity * (1 + self.tau)

    def holds(self, perplexity: float) -> bool:
        """Whether ``perplexity`` is within the budget."""
        return perplexity <= self.limit


def budget_cost(predict: Predict, log_budget: float, weight: float, unit: float) -> Cost:
    """``bias + weight * max(0, log_ppl - log_budget) / unit`` of each state (see module docstring)."""

    def cost(states: torch.Tensor) -> torch.Tensor:
        b, lp = predict(states)
        return b + weight * torch.clamp(lp - log_budget, min=0) / unit

    return cost


def trust_region(rows: Sequence[StoredEvaluation], budget: Budget, k_min: int, k_max: int,
                 slack: float = 1.25) -> tuple[int, int]:
    """``[k_min, k_max]`` with ``k_max`` cut to ``slack`` x the largest pruned count that met the budget.

    Surrogates fitted on ~100 masks are easy to fool far from the data (on SmolLM2 the
    annealer found 54-head masks predicted at +3% perplexity that measured +60%).

    When no mask of two or more heads met the budget (every design sample landed just over
    it, as on evaluation seed 23, where the closest of 16 measured +5.07% against +5%), the
    largest feasible count is a single-head knockout's and says nothing about how many heads
    fit: the count is then :func:`budget_count`, where the evaluated multi-head masks' median
    per-head perplexity cost reaches the budget (capped at the largest count evaluated).
    """
    fits, _ = fitting_count(rows, budget)
    if fits:
        k_max = max(k_min, min(k_max, int(math.ceil(fits * slack))))
    return k_min, k_max


def largest_feasible(rows: Sequence[StoredEvaluation], budget: Budget) -> int:
    """The largest pruned count among ``rows`` within the budget (0 when none is)."""
    return max((r.mask.n_pruned for r in rows if budget.holds(r.perplexity)), default=0)


def fitting_count(rows: Sequence[StoredEvaluation], budget: Budget) -> tuple[float, bool]:
    """The pruned count :func:`trust_region` scales, and whether :func:`budget_count` estimated it.

    The largest count within the budget; when that is a single head (or none), the per-head
    estimate if it is larger.
    """
    fits = largest_feasible(rows, budget)
    if fits < 2:
        estimate = budget_count(rows, budget)
        if estimate > fits:
            return estimate, True
    return fits, False


def budget_count(rows: Sequence[StoredEvaluation], budget: Budget) -> float:
    """The pruned count at which the median per-head log-perplexity cost of ``rows``' multi-head masks reaches the budget.

    0 when no multi-head mask was evaluated; never above the largest count evaluated (the
    surrogates know nothing beyond it).
    """
    multi = [r for r in rows if r.mask.n_pruned >= 2 and r.perplexity > 0]
    if not multi:
        return 0.0
    median = float(np.median([math.log(r.perplexity / budget.base_perplexity) / r.mask.n_pruned for r in multi]))
    if median <= 0:
        return 0.0
    return min(math.log1p(budget.tau) / median, float(max(r.mask.n_pruned for r in multi)))


def window_differences(row: StoredEvaluation, base: StoredEvaluation) -> np.ndarray:
    """Per-window change in mean token NLL (log-perplexity) of ``row`` from ``base`` on the same equal-length windows."""
    a = np.asarray(row.perplexity_result.per_window, dtype=float)
    b = np.asarray(base.perplexity_result.per_window, dtype=float)
    return (a - b) / (row.perplexity_result.tokens / len(a))


def perplexity_change_bound(row: StoredEvaluation, base: StoredEvaluation, confidence: float,
                            fresh_tokens: int = 0) -> tuple[float, float]:
    """(change, upper confidence bound) of ``row``'s perplexity relative to ``base`` on the same windows.

    Both evaluations hold per-window NLL sums of the same equal-length windows; the change in
    log-perplexity is the mean per-window difference, and its standard error comes from the
    spread of those differences across windows (a paired comparison). One-sided bound at
    ``confidence`` with Student's t quantile on ``windows - 1`` degrees of freedom: with a
    dozen windows the normal quantile under-states the margin.

    ``fresh_tokens > 0``: the bound is instead on what a fresh text of that many scored tokens
    in windows of the same length (the test text) will report as *its* one-sided bound, so
    that a change within this bound is within it there too at ``confidence``. The fresh
    text's mean is a second draw around the true change, so its standard error adds to this
    one in quadrature, and its own bound adds its margin (normal quantile, as its bootstrap):
    ``mean + t * sqrt(se^2 + se_fresh^2) + z * se_fresh``, with ``se_fresh = se * sqrt(tokens /
    fresh_tokens)`` (the per-window spread measured here). Without it a choice near the budget
    holds on the confirmation text and misses on the test text about a quarter of the time.
    """
    d = window_differences(row, base)
    if len(d) < 2:
        change = math.expm1(float(d.mean())) if len(d) else 0.0
        return change, change
    se = d.std(ddof=1) / math.sqrt(len(d))
    margin = bound_quantile(confidence, len(d), row.perplexity_result.tokens, fresh_tokens) * se
    return math.expm1(d.mean()), math.expm1(d.mean() + margin)


def bound_quantile(confidence: float, windows: int, tokens: int = 0, fresh_tokens: int = 0) -> float:
    """The multiple of the confirmation's standard error that :func:`perplexity_change_bound` adds.

    Student's t on ``windows - 1`` degrees of freedom; with ``fresh_tokens > 0`` (``tokens``: the
    confirmation's scored tokens), ``t * sqrt(1 + r) + z * sqrt(r)`` with ``r = tokens / fresh_tokens``.
    Also what reads a standard error back off a recorded bound (the benchmarks).
    """
    from statistics import NormalDist

    from scipy.stats import t as student_t

    quantile = float(student_t.ppf(confidence, windows - 1))
    if fresh_tokens <= 0:
        return quantile
    r = tokens / fresh_tokens
    return quantile * math.sqrt(1 + r) + NormalDist().inv_cdf(confidence) * math.sqrt(r)


@dataclass
class Selection:
    """A method's choice: the screened candidates, their confirmation, and the chosen one."""

    chosen: StoredEvaluation | None
    confirmed: StoredEvaluation | None
    base_confirmed: StoredEvaluation | None
    candidates: list[ConfirmedCandidate] = field(default_factory=list)
    confirmation_seconds: float = 0.0
    shortlist: list[HeadMask] = field(default_factory=list)  # the confirmed masks, in the order of ``candidates``

    def summary(self, policy: "SelectionPolicy | None" = None) -> Choice | None:
        """Validation numbers of the choice (screening and, when confirmed, confirmation).

        ``policy``: also the confirmed perplexity change's bound as that policy's rule computes it.
        """
        if self.chosen is None:
            return None
        c = self.chosen
        out = Choice(bias=c.bias, perplexity=c.perplexity, n_pruned=c.mask.n_pruned, source=c.source,
                     ci=list(c.bias_ci))
        if self.confirmed is not None:
            k, b = self.confirmed, self.base_confirmed
            change = k.perplexity / b.perplexity - 1
            bound = policy.change_bound(k, b)[1] if policy is not None else None
            out.confirmed = ConfirmedValues(bias=k.bias, perplexity=k.perplexity, perplexity_change=change,
                                            ci=list(k.bias_ci), perplexity_change_bound=bound)
        return out


# (a mask's perplexity-only confirmation, the unrepaired model's) -> whether the choice needs its bias
NeedsBias = Callable[[StoredEvaluation, StoredEvaluation], bool]

# (masks, source, needs_bias) -> their evaluations on the confirmation data (NaN bias where ``needs_bias`` said
# no), and the unrepaired model's (see :meth:`attnprune.run.Run.confirm`)
Confirm = Callable[[list[HeadMask], str, NeedsBias], tuple[list[StoredEvaluation], StoredEvaluation]]


# masks -> for each mask, every guard's verdict on the confirmation data, by guard name
# (see :meth:`attnprune.run.Run.guard`)
Guard = Callable[[list[HeadMask]], list[dict[str, GuardVerdict]]]


# validation perplexity changes (x tau) at which the confirmation shortlist takes its lowest bias
SHORTLIST_LEVELS = (0.2, 0.4, 0.6)


@dataclass(frozen=True)
class SelectionPolicy:
    """Budget, cost and choice with the run's ``tau`` and ``penalty``.

    With ``confirm > 0`` the choice survives the winner's curse: ``confirm`` candidates
    (pruning something, below the unrepaired bias, within ``tau + screen_slack`` on
    validation perplexity; see :meth:`screen`) are measured again on confirmation data
    the search never saw (fresh validation prompts, the other half of the validation
    text); the choice is the lowest confirmed bias among those whose confirmed perplexity
    change is within ``tau`` at one-sided ``confidence``. With ``confirm = 0`` it is the
    lowest validation bias within the budget.
    """

    tau: float
    penalty: float
    confirm: int = 0
    screen_slack: float = 0.02
    confidence: float = 0.95
    guards: tuple[str, ...] = ()
    guard_margin: float = 0.1
    guard_test: str = "within"  # --guard-test: the rise shown within the margin, or ("harm") not shown beyond it
    auto_guard: bool = False  # --guard auto: the run leaves out some axes (run.auto_leaves_out)
    hold_tokens: int = 0  # the budget holds on a fresh text of this many tokens as its bound says (0: the change)

    @classmethod
    def of(cls, cfg) -> "SelectionPolicy":
        """The policy a run's configuration asks for."""
        return cls(cfg.tau, cfg.penalty, cfg.confirm, confidence=cfg.confidence, guards=tuple(getattr(cfg, "guards", ())),
                   guard_margin=getattr(cfg, "guard_margin", 0.1),
                   guard_test=getattr(cfg, "guard_test", "within"), auto_guard=getattr(cfg, "auto_guard", False),
                   hold_tokens=getattr(cfg, "held_tokens", 0))

    def budget(self, base: StoredEvaluation) -> Budget:
        """The budget relative to the unrepaired model's evaluation ``base``."""
        return Budget(base.perplexity, self.tau)

    @property
    def unit(self) -> float:
        """Log-perplexity excess that costs ``penalty`` bias standard deviations."""
        return math.log(1 + max(self.tau, 1e-3))

    def cost(self, predict: Predict, base_log_perplexity: float, bias_scale: float, tau: float | None = None) -> Cost:
        """The annealing cost: ``predict``'s bias plus the budget penalty (relative to ``base_log_perplexity``).

        ``tau`` (default the policy's) sets where the penalty starts.
        """
        tau = self.tau if tau is None else tau
        return budget_cost(predict, base_log_perplexity + math.log(1 + tau), self.penalty * bias_scale, self.unit)

    def best_within_budget(self, rows: Sequence[StoredEvaluation], base: StoredEvaluation) -> StoredEvaluation | None:
        """Lowest validation bias among ``rows`` that prune something, meet the budget and beat ``base``."""
        budget = self.budget(base)
        ok = [r for r in rows if r.mask.n_pruned > 0 and budget.holds(r.perplexity) and r.bias < base.bias]
        return min(ok, key=lambda r: r.bias) if ok else None

    def screen(self, rows: Sequence[StoredEvaluation], base: StoredEvaluation) -> list[StoredEvaluation]:
        """The ``confirm`` distinct candidates worth confirming, lowest validation bias first.

        The first picks hedge against the perplexity side of the winner's curse: the lowest
        validation bias within each of :data:`SHORTLIST_LEVELS` x ``tau`` of validation
        perplexity change (a search that chose near the budget on validation text is
        usually over it on fresh text); the rest are the lowest validation biases.
        """
        loose = Budget(base.perplexity, self.tau + self.screen_slack)
        ok = {r.mask: r for r in rows if r.mask.n_pruned > 0 and loose.holds(r.perplexity) and r.bias < base.bias}
        by_bias = sorted(ok.values(), key=lambda r: r.bias)
        picked: list[StoredEvaluation] = []
        keys: set[str] = set()
        for level in SHORTLIST_LEVELS:
            if len(picked) >= self.confirm // 2:
                break
            within = Budget(base.perplexity, level * self.tau)
            pick = next((r for r in by_bias if within.holds(r.perplexity) and r.mask.key not in keys), None)
            if pick is not None:
                picked.append(pick)
                keys.add(pick.mask.key)
        picked += [r for r in by_bias if r.mask.key not in keys][: self.confirm - len(picked)]
        return sorted(picked, key=lambda r: r.bias)

    def change_bound(self, confirmed: StoredEvaluation, base: StoredEvaluation) -> tuple[float, float]:
        """(change, one-sided bound) of a confirmation's perplexity against ``base``'s: the bound the choice uses.

        With :attr:`hold_tokens`, the bound on what the test text of that size will report (see
        :func:`perplexity_change_bound`).
        """
        return perplexity_change_bound(confirmed, base, self.confidence, self.hold_tokens)

    def holds_budget(self, confirmed: StoredEvaluation, base: StoredEvaluation) -> bool:
        """Whether a confirmation's perplexity change is within ``tau`` at the policy's one-sided confidence.

        The choice needs a candidate's confirmed bias only then (:data:`NeedsBias`): the bias is
        41% of a confirmation's seconds (``benchmarks/confirmation_split.py``).
        """
        return self.change_bound(confirmed, base)[1] <= self.tau

    def select(self, rows: Sequence[StoredEvaluation], base: StoredEvaluation, confirm: Confirm | None,
               source: str, guard: Guard | None = None, keep: Sequence[StoredEvaluation] = ()) -> Selection:
        """The choice among ``rows`` (see class docstring); ``confirm`` measures candidates on confirmation data.

        ``keep``: masks an earlier selection of the same method confirmed admissible (AP's
        calibration); they join the shortlist when it lacks them (their confirmations are read
        back, not measured again), so a later shortlist of masks that all fail cannot leave the
        method with nothing while an admissible mask was confirmed.

        With :attr:`guards` and a ``guard``, a candidate that passes the budget and lowers
        bias is admissible only if every guard holds. Guards are measured for those
        candidates only, in order of confirmed bias, and only until one holds them all (each
        costs an evaluation per guarded axis): the candidates after it keep ``guards=None``
        and are not admissible, since the choice would not take them anyway.
        """
        if self.confirm <= 0 or confirm is None:
            best = self.best_within_budget(rows, base)
            return Selection(best, None, None)
        shortlist = self.screen(rows, base)
        listed = {r.mask.key for r in shortlist}
        for r in keep:
            if r.mask.key not in listed:
                shortlist.append(r)
                listed.add(r.mask.key)
        if not shortlist:
            return Selection(None, None, None)
        confirmed, base_c = confirm([r.mask for r in shortlist], source, self.holds_budget)
        candidates, best, best_c = [], None, None
        bounds = [self.change_bound(conf, base_c) for conf in confirmed]
        primary = [bound <= self.tau and conf.bias < base_c.bias for conf, (_, bound) in zip(confirmed, bounds)]
        verdicts: list[dict[str, GuardVerdict] | None] = [None] * len(shortlist)
        guarded = bool(self.guards) and guard is not None
        if guarded:
            # lowest confirmed bias first, until one holds every guard: the choice is that one, and the
            # candidates after it cannot be chosen, so their guards are not measured (each costs evaluations)
            for i in sorted((i for i, ok in enumerate(primary) if ok), key=lambda i: confirmed[i].bias):
                verdicts[i] = guard([shortlist[i].mask])[0]
                if all(g.ok for g in verdicts[i].values()):
                    break
        for screened, conf, (change, bound), ok, verdict in zip(shortlist, confirmed, bounds, primary, verdicts):
            if guarded:
                ok = ok and verdict is not None and all(g.ok for g in verdict.values())
            candidates.append(ConfirmedCandidate(
                pruned=[list(p) for p in screened.mask.pruned], source=screened.source, valid_bias=screened.bias,
                valid_perplexity=screened.perplexity, confirmed_bias=None if math.isnan(conf.bias) else conf.bias,
                confirmed_perplexity_change=change,
                confirmed_perplexity_change_bound=bound, admissible=ok, guards=verdict))
            if ok and (best_c is None or conf.bias < best_c.bias):
                best, best_c = screened, conf
        return Selection(best, best_c, base_c, candidates, sum(r.seconds for r in confirmed), [r.mask for r in shortlist])

    def choose(self, rows: Sequence[StoredEvaluation], base: StoredEvaluation, confirm: Confirm | None = None,
               source: str = "confirm", guard: Guard | None = None, keep: Sequence[StoredEvaluation] = ()) -> Selection:
        """:meth:`select`, or one sentence saying what to change when nothing qualifies."""
        selection = self.select(rows, base, confirm, source, guard, keep)
        if selection.chosen is None:
            raise UserError(
                f"No evaluated mask lowers validation bias below {base.bias:.3f} while keeping perplexity within "
                f"{1 + self.tau:.2f} x {base.perplexity:.2f}"
                + (" on the confirmation data" if self.confirm > 0 else "")
                + (f" and keeping {', '.join(self.guards)} within the guard margin" if self.guards and guard else "")
                + ("; raise --tau, --guard-margin, --samples or --rounds" if self.guards and guard else
                   "; raise --tau, --samples or --rounds"
                   + (f", or lower --confidence (now {self.confidence:g})" if self.confirm > 0 else ""))
                + " (the store keeps every evaluation, so a rerun continues)."
            )
        return selection

    def rule(self) -> str:
        """The choice rule in words (for reports)."""
        if self.confirm <= 0:
            return (f"lowest validation bias among the method's evaluated masks that prune at least one head, keep "
                    f"validation perplexity within {1 + self.tau:.2f} x the unrepaired model's and lower bias below it")
        levels = ", ".join(f"+{100 * f * self.tau:g}%" for f in SHORTLIST_LEVELS)
        return (f"{self.confirm} masks (pruning at least one head, bias below the unrepaired model's, validation "
                f"perplexity within {1 + self.tau + self.screen_slack:.2f} x: the lowest validation bias within "
                f"{levels} of validation perplexity change, then the lowest validation biases) are "
                f"re-measured on confirmation data the search never saw (fresh validation prompts, the other half of the "
                f"validation text); the choice is the lowest confirmed bias among those whose confirmed perplexity change is at "
                f"most {100 * self.tau:.0f}% at one-sided {100 * self.confidence:.0f}% confidence (paired over text "
                "windows" + (f"; the bound is on what a fresh text of {self.hold_tokens:,} tokens, the test text, "
                              "will report as its own one-sided bound: it adds that text's noise to the confirmation's"
                              if self.hold_tokens > 0 else "") + ") and whose confirmed bias is below the unrepaired model's (a candidate's confirmation "
                "measures perplexity first, and its bias only when that bound holds; after AP's calibration, the "
                "masks an earlier confirmation admitted stay among the candidates)" + self.guard_rule())

    def _auto_words(self) -> str:
        """What ``--guard auto`` leaves out, as :func:`attnprune.run.auto_leaves_out` decides under this test."""
        if self.guard_test == "harm":
            return " (--guard auto: an axis whose prompts fall in one bucket there is not guarded)"
        return (" (--guard auto: an axis whose unrepaired bias is within the 95th percentile of its noise floor there "
                "is not guarded)")

    def guard_rule(self) -> str:
        """The guards' part of :meth:`rule` (empty without guards)."""
        if not self.guards:
            return ""
        axes = [g for g in self.guards if g != labels.LMS_GUARD]
        what = []
        if axes:
            what.append(f"the bias of every guarded axis ({', '.join(axes)}), measured on its validation prompts "
                        "(both halves: the search and the confirmations read only the repaired axis)"
                        + (self._auto_words() if self.auto_guard else "") + ",")
        if labels.LMS_GUARD in self.guards:
            what.append("StereoSet's error rate 100 - LMS, measured on its validation items of every bias type,")
        paired = "(paired bootstrap over the same prompts or items)"
        margin = f"{100 * self.guard_margin:g}% of its unrepaired value"
        if self.guard_test == "harm":
            return (f"; and {' and '.join(what)} is not shown to rise by more than {margin} (the change's one-sided "
                    f"{100 * self.confidence:.0f}% lower bound is within it: a measured rise beyond the margin is "
                    f"refused, one the data cannot resolve is not) {paired}")
        return (f"; and {' and '.join(what)} rises by at most {margin} at one-sided {100 * self.confidence:.0f}% "
                f"confidence {paired}")
