"""The shared selection policy on hand-made evaluations (no model)."""

import dataclasses
import math

import pytest

from attnprune.heads import HeadMask
from attnprune.results import ConfirmedCandidate, GuardVerdict
from attnprune.selection import SHORTLIST_LEVELS, Budget, SelectionPolicy, budget_count, fitting_count, largest_feasible, trust_region
from attnprune.store import StoredEvaluation


def row(pruned, bias, perplexity):
    return StoredEvaluation(HeadMask.from_pruned(2, 4, pruned), "valid", "candidate", bias, (bias, bias), perplexity,
                            {}, 1.0, "now")


def test_shortlist_hedges_along_perplexity_then_takes_the_lowest_biases():
    policy = SelectionPolicy(tau=0.05, penalty=1.0, confirm=4)
    base = row([], 1.0, 100.0)
    near_budget = [row([(0, h)], 0.1 + 0.01 * h, 104.9) for h in range(4)]  # lowest biases, all near the budget
    safe = row([(1, 0)], 0.5, 100.9)   # within 0.2 x tau
    middle = row([(1, 1)], 0.3, 101.9)  # within 0.4 x tau
    over = row([(1, 2)], 0.01, 108.0)   # over tau + slack: never shortlisted
    worse = row([(1, 3)], 1.2, 100.0)   # no better than the unrepaired model
    shortlist = policy.screen([base, *near_budget, safe, middle, over, worse], base)
    keys = [r.mask.key for r in shortlist]
    assert SHORTLIST_LEVELS[:2] == (0.2, 0.4)
    # confirm // 2 = 2 hedged picks (the lowest bias within +1% and within +2%), then the two lowest biases
    assert set(keys) == {safe.mask.key, middle.mask.key, near_budget[0].mask.key, near_budget[1].mask.key}
    assert [r.bias for r in shortlist] == sorted(r.bias for r in shortlist)
    # without hedged candidates available the shortlist is the lowest biases
    assert [r.mask.key for r in policy.screen([base, *near_budget], base)] == [r.mask.key for r in near_budget]


def test_calibration_charges_the_gap_per_pruned_head_within_tau_less_the_margin(monkeypatch):
    import math

    from attnprune.methods.ap import AttentionPruning
    from attnprune.selection import Selection

    base = row([], 1.0, 100.0)
    # search said +1% and +2%; confirmation said +4% and +5% (bounds +5% and +6%): a 3% gap, a 1% margin
    def candidate(valid_perplexity, change, bound):
        return ConfirmedCandidate(pruned=[[0, 0]], source="x", valid_bias=0.5, valid_perplexity=valid_perplexity,
                                  confirmed_bias=0.5, confirmed_perplexity_change=change,
                                  confirmed_perplexity_change_bound=bound, admissible=False)

    candidates = [candidate(101.0, 0.04, 0.05), candidate(102.0, 0.05, 0.06)]

    def masks(confirmed):  # the shortlist's masks, in the order of its confirmed candidates
        return [HeadMask.from_pruned(2, 4, [(1, i)]) for i in range(len(confirmed))]

    policy = SelectionPolicy(tau=0.05, penalty=1.0, confirm=2)

    class FakeRun:  # what a MethodContext's calibration reads
        def base(self):
            return base

        def select(self, rows, source):
            return policy.select(rows, base, None, source)

    FakeRun.policy = policy
    ap = AttentionPruning()
    monkeypatch.setattr(ap, "training_data", lambda ctx, before_round=None: [base])
    monkeypatch.setattr(SelectionPolicy, "select", lambda self, *a: Selection(None, None, base, candidates, shortlist=masks(candidates)))
    cal, failed, admitted, chosen = ap.calibrated_budget(FakeRun())
    # the masks confirmed over the budget (the second: bound +6%) come back to be retired ...
    assert failed == {masks(candidates)[1].key} and cal.retired == 1
    assert admitted == frozenset()  # neither was admissible (the choice keeps the admissible ones)
    assert chosen is None  # the selection chose nothing
    # ... and a retired mask is not offered to the next selection
    seen = []
    monkeypatch.setattr(ap, "training_data", lambda ctx, before_round=None: [base, row([(1, 1)], 0.2, 100.5)])
    monkeypatch.setattr(SelectionPolicy, "select", lambda self, rows, *a: seen.append(rows) or Selection(
        None, None, base, candidates, shortlist=masks(candidates)))
    ap.calibrated_budget(FakeRun(), retired=failed)
    assert [r.mask.key for r in seen[-1]] == [base.mask.key]
    monkeypatch.setattr(ap, "training_data", lambda ctx, before_round=None: [base])
    gap = (math.log(1.04 / 1.01) + math.log(1.05 / 1.02)) / 2
    margin = (math.log(1.05 / 1.04) + math.log(1.06 / 1.05)) / 2
    assert cal.gap == pytest.approx(math.expm1(gap)) and cal.margin == pytest.approx(math.expm1(margin))
    # the gap is charged per pruned head (each candidate prunes one), within tau less the margin
    assert cal.gap_per_head == pytest.approx(gap) and cal.heads == 1
    assert cal.search_budget == pytest.approx(math.expm1(math.log(1.05) - margin))
    # the seed-21 case: a gap of most of tau still leaves room for fewer heads; only the margin can fill tau
    for c in candidates:
        c.confirmed_perplexity_change, c.confirmed_perplexity_change_bound = 0.2, 0.21
    assert ap.calibrated_budget(FakeRun())[0].search_budget == pytest.approx(math.expm1(math.log(1.05) - math.log(1.21 / 1.2)))
    for c in candidates:
        c.confirmed_perplexity_change_bound = 0.3
    # candidates that failed on bias only (bounds within tau): a lower budget would not help
    bias_only = [dataclasses.replace(c, confirmed_perplexity_change=0.01, confirmed_perplexity_change_bound=0.02)
                 for c in candidates]
    monkeypatch.setattr(SelectionPolicy, "select", lambda self, *a: Selection(None, None, base, bias_only, shortlist=masks(bias_only)))
    assert ap.calibrated_budget(FakeRun())[0] is None
    monkeypatch.setattr(SelectionPolicy, "select", lambda self, *a: Selection(None, None, base, candidates, shortlist=masks(candidates)))
    # a margin larger than tau leaves no room; a chosen candidate needs no calibration
    assert ap.calibrated_budget(FakeRun())[0].search_budget is None
    monkeypatch.setattr(SelectionPolicy, "select", lambda self, *a: Selection(base, base, base, candidates, shortlist=masks(candidates)))
    assert ap.calibrated_budget(FakeRun())[0] is None
    # the seed-11 case: the search's candidates miss on perplexity and a knockout is admissible;
    # the knockout must not stop the calibration, and a chosen search candidate must
    searched = [dataclasses.replace(c, source="candidate-r0") for c in candidates]
    knockout = dataclasses.replace(base, source="knockout")
    monkeypatch.setattr(SelectionPolicy, "select", lambda self, *a: Selection(knockout, knockout, base, searched, shortlist=masks(searched)))
    assert ap.calibrated_budget(FakeRun())[0] is not None
    found = dataclasses.replace(base, source="ap_paper:candidate-r1")
    monkeypatch.setattr(SelectionPolicy, "select", lambda self, *a: Selection(found, found, base, searched, shortlist=masks(searched)))
    assert ap.calibrated_budget(FakeRun())[0] is None


def test_a_per_head_charge_makes_the_search_prune_fewer_heads():
    """Every head lowers bias by 1 and costs nothing on the search text: without a charge the search takes as many
    heads as the bounds allow; charged 1.2% per head within a +5% budget it takes 4 (4.8%; a fifth head's excess costs
    more than its bias)."""
    import torch

    from attnprune.methods.ap import head_charged
    from attnprune.search.annealing import anneal

    cells = 12

    def predict(states):
        return states.sum(1).to(torch.float32), torch.zeros(states.shape[0])

    policy = SelectionPolicy(tau=0.05, penalty=10.0)
    for per_head, most in ((0.0, 10), (0.012, 4)):
        cost = policy.cost(head_charged(predict, per_head, cells), 0.0, 1.0)
        best = anneal(cost, cells, 1, 10, chains=32, steps=400, seed=0).states[0]
        assert cells - int(best.sum()) == most


def test_perplexity_change_bound_on_hand_made_windows():
    """Four windows of 100 tokens; per-token log-perplexity differences 0.01, 0.03, 0.02, 0.04."""
    import math

    from scipy.stats import t

    from attnprune.selection import perplexity_change_bound

    base = StoredEvaluation(HeadMask.all_active(2, 4), "valid", "confirm", 1.0, (1, 1), 100.0,
                            {"perplexity": {"per_window": [100.0, 200.0, 300.0, 400.0], "tokens": 400}}, 1.0, "now")
    row = StoredEvaluation(HeadMask.from_pruned(2, 4, [(0, 0)]), "valid", "confirm", 1.0, (1, 1), 100.0,
                           {"perplexity": {"per_window": [101.0, 203.0, 302.0, 404.0], "tokens": 400}}, 1.0, "now")
    change, bound = perplexity_change_bound(row, base, 0.8)
    # mean 0.025, sd (ddof 1) sqrt(5e-4 / 3), se = sd / 2, one-sided t quantile on 3 degrees of freedom
    se = math.sqrt(5e-4 / 3) / 2
    assert change == pytest.approx(math.expm1(0.025), rel=1e-9)
    assert bound == pytest.approx(math.expm1(0.025 + t.ppf(0.8, 3) * se), rel=1e-9)
    assert t.ppf(0.8, 3) == pytest.approx(0.9785, abs=1e-4)  # wider than the normal 0.8416
    # the unrepaired model against itself: no change, no margin
    assert perplexity_change_bound(base, base, 0.8) == (0.0, 0.0)


def test_a_bound_for_the_test_text_adds_its_noise_and_its_own_margin():
    """``fresh_tokens``: t * sqrt(se^2 + se_fresh^2) + z * se_fresh, se_fresh scaled by the tokens."""
    from statistics import NormalDist

    from scipy.stats import t

    from attnprune.selection import perplexity_change_bound

    base = _windows_row([100.0, 200.0, 300.0, 400.0])
    row = _windows_row([101.0, 203.0, 302.0, 404.0], pruned=[(0, 0)])
    se = math.sqrt(5e-4 / 3) / 2
    se_fresh = se * math.sqrt(400 / 1600)  # four times the tokens: half the standard error
    change, bound = perplexity_change_bound(row, base, 0.9, fresh_tokens=1600)
    assert change == pytest.approx(math.expm1(0.025), rel=1e-9)
    assert bound == pytest.approx(math.expm1(0.025 + t.ppf(0.9, 3) * math.hypot(se, se_fresh)
                                             + NormalDist().inv_cdf(0.9) * se_fresh), rel=1e-9)
    assert bound > perplexity_change_bound(row, base, 0.9)[1]
    policy = SelectionPolicy(tau=0.05, penalty=1.0, confirm=2, confidence=0.9, hold_tokens=1600)
    assert policy.change_bound(row, base) == (change, bound)
    assert "fresh text of 1,600 tokens" in policy.rule()


def _windows_row(per_window, pruned=(), tokens=None):
    tokens = tokens or 100 * len(per_window)
    return StoredEvaluation(HeadMask.from_pruned(2, 4, list(pruned)), "valid", "confirm", 1.0, (1, 1), 100.0,
                            {"perplexity": {"per_window": list(per_window), "tokens": tokens}}, 1.0, "now")


def test_the_test_text_bound_holds_where_the_confirmation_bound_held_at_the_rules_confidence():
    """Simulated texts: six candidates confirmed on 32 windows, the choice reported on 64 test windows.

    The choice takes the admissible candidate with the largest true change (more heads pruned:
    lower bias, higher perplexity), so it sits near the budget's edge. With the bound on the
    change itself, its test text's own bound misses the budget far more often than 5%; with
    the bound for the test text, less often than that.
    """
    import numpy as np

    from attnprune.stats import window_bootstrap

    rng = np.random.default_rng(0)
    tau, sd, per_window = 0.05, 0.04, 100  # per-token log-perplexity spread between windows of 100 tokens
    base_c, base_t = _windows_row([0.0] * 32), np.zeros(64)
    policies = {hold: SelectionPolicy(tau=tau, penalty=1.0, confirm=1, confidence=0.95, hold_tokens=hold)
                for hold in (0, 64 * per_window)}
    misses = {hold: [] for hold in policies}
    for _ in range(400):
        true = rng.uniform(0.0, 1.5 * math.log1p(tau), 6)
        confirmed = [_windows_row(per_window * rng.normal(x, sd, 32)) for x in true]
        test = [per_window * rng.normal(x, sd, 64) for x in true]
        for hold, policy in policies.items():
            admissible = [i for i in range(6) if policy.holds_budget(confirmed[i], base_c)]
            if admissible:
                i = max(admissible, key=lambda i: true[i])
                misses[hold].append(window_bootstrap(test[i], base_t, 64 * per_window, reps=400)["upper"] > tau)
    assert min(len(m) for m in misses.values()) > 350  # both rules choose in almost every trial
    assert np.mean(misses[0]) > 0.09  # 0.136 with this seed
    assert np.mean(misses[64 * per_window]) < 0.05  # 0.026


def test_guards_refuse_a_candidate_that_worsens_a_guarded_axis_and_are_measured_only_where_they_decide():
    """Guards are measured in order of confirmed bias until one candidate holds them all, never over the budget."""
    def windows(ppl_offset):
        return {"perplexity": {"per_window": [100.0 + ppl_offset, 200.0 + ppl_offset], "tokens": 200}}

    def confirmed(mask, bias, offset):
        return StoredEvaluation(mask, "valid", "confirm", bias, (bias, bias), 100.0, windows(offset), 1.0, "now")

    base = row([], 1.0, 100.0)
    best, second, over = row([(0, 0)], 0.2, 100.5), row([(0, 1)], 0.3, 100.5), row([(0, 2)], 0.1, 100.6)
    third = row([(0, 3)], 0.25, 100.5)  # screened before `second`, but confirms higher: never guarded
    conf = {best.mask: confirmed(best.mask, 0.2, 0), second.mask: confirmed(second.mask, 0.4, 0),
            third.mask: confirmed(third.mask, 0.6, 0),
            over.mask: confirmed(over.mask, 0.1, 60)}  # +30% perplexity on the confirmation text: over the budget
    base_c = confirmed(base.mask, 1.0, 0)
    asked = []

    def guard(masks):
        asked.extend(masks)
        return [{"religion": GuardVerdict(unrepaired=0.5, change=0.2 if m == best.mask else 0.0,
                                          upper=0.25 if m == best.mask else 0.02, limit=0.05, ok=m != best.mask)}
                for m in masks]

    policy = SelectionPolicy(tau=0.05, penalty=1.0, confirm=4, guards=("religion",), guard_margin=0.1)
    rows = [base, best, second, third, over]
    sel = policy.select(rows, base, lambda ms, src, *_: ([conf[m] for m in ms], base_c), "x", guard)
    assert sel.chosen.mask == second.mask, "the lowest confirmed bias fails its guard"
    assert asked == [best.mask, second.mask], "by confirmed bias, until one holds; none over the budget"
    by_mask = {tuple(map(tuple, c.pruned)): c for c in sel.candidates}
    assert by_mask[((0, 0),)].guards["religion"].ok is False and not by_mask[((0, 0),)].admissible
    assert by_mask[((0, 3),)].guards is None and not by_mask[((0, 3),)].admissible
    assert "religion" in policy.rule() and "10% of its unrepaired value" in policy.rule()
    # without the guard the same policy takes the lowest confirmed bias
    assert policy.select(rows, base, lambda ms, src, *_: ([conf[m] for m in ms], base_c),
                         "x").chosen.mask == best.mask
    assert "guard" not in SelectionPolicy(tau=0.05, penalty=1.0, confirm=3).rule()


def test_a_mask_an_earlier_confirmation_admitted_stays_a_candidate_when_the_last_shortlist_fails():
    """Evaluation seed 30: a later shortlist of masks that all miss the budget displaced an admissible knockout."""
    def confirmed(mask, bias, offset):
        return StoredEvaluation(mask, "valid", "confirm", bias, (bias, bias), 100.0,
                                {"perplexity": {"per_window": [100.0 + offset, 200.0 + offset], "tokens": 200}},
                                1.0, "now")

    base = row([], 1.0, 100.0)
    knockout = row([(1, 1)], 0.9, 100.3)
    failing = [row([(0, h)], 0.2 + 0.01 * h, 100.2) for h in range(3)]  # lower search bias, over on confirmation
    conf = {knockout.mask: confirmed(knockout.mask, 0.8, 0), **{r.mask: confirmed(r.mask, 0.3, 60) for r in failing}}
    base_c = confirmed(base.mask, 1.0, 0)

    def confirm(masks, source, *_):
        return [conf[m] for m in masks], base_c

    policy = SelectionPolicy(tau=0.05, penalty=1.0, confirm=3)
    rows = [base, knockout, *failing]
    assert [r.mask for r in policy.screen(rows, base)] == [r.mask for r in failing]
    assert policy.select(rows, base, confirm, "x").chosen is None
    sel = policy.select(rows, base, confirm, "x", keep=[knockout])
    assert sel.chosen.mask == knockout.mask and len(sel.candidates) == 4
    assert policy.select(rows, base, confirm, "x", keep=[failing[0]]).chosen is None  # listed once, still over
    assert "an earlier confirmation admitted" in policy.rule()


def test_a_proposal_offers_its_kept_masks_to_the_choice_unless_retired():
    from attnprune.methods.base import Proposal

    a, b, c = row([(0, 0)], 0.5, 100.0), row([(0, 1)], 0.4, 100.0), row([(0, 2)], 0.3, 100.0)
    p = Proposal([a, b, c], 3, 1.0, kept=frozenset({a.mask.key, b.mask.key}), retired=frozenset({b.mask.key}))
    assert p.kept_rows() == [a] and p.selectable() == [a, c]


def test_front_plots_a_mask_chosen_at_several_budgets_once_with_every_budget():
    from types import SimpleNamespace

    from attnprune.front import distinct_choices
    from attnprune.results import FrontPoint

    a, b = SimpleNamespace(key="a"), SimpleNamespace(key="b")
    points = [FrontPoint(0.01, 4, 1.0, a), FrontPoint(0.025, 2, 1.0, a), FrontPoint(0.05, 0, 0.0, None),
              FrontPoint(0.1, 1, 1.0, b)]
    assert distinct_choices(points) == [(a, [0.01, 0.025]), (b, [0.1])]


def test_a_proposal_offers_no_retired_mask_to_the_selection():
    from attnprune.methods.base import Proposal

    rows = [row([(0, 0)], 0.3, 100.0), row([(0, 1)], 0.4, 100.0)]
    proposal = Proposal(rows, 2, 1.0, retired=frozenset({rows[0].mask.key}))
    assert proposal.selectable() == [rows[1]] and proposal.rows == rows  # still evaluated and counted


def big(n, perplexity, shape=(4, 8)):
    """A validation row pruning the first ``n`` heads of a 4 x 8 model."""
    pruned = [divmod(i, shape[1]) for i in range(n)]
    return StoredEvaluation(HeadMask.from_pruned(*shape, pruned), "valid", "sample", 1.0, (1.0, 1.0), perplexity, {},
                            0.0, "now")


def test_trust_region_is_slack_times_the_largest_count_within_budget():
    budget = Budget(100.0, 0.05)
    rows = [big(0, 100.0), big(1, 101.0), big(8, 104.9), big(12, 106.0)]
    assert trust_region(rows, budget, 1, 32) == (1, 10)  # ceil(1.25 x 8); the 12-head mask is over budget
    assert trust_region(rows, budget, 1, 9) == (1, 9)  # never above the caller's k_max


def test_trust_region_without_a_feasible_multi_head_mask_uses_the_per_head_cost():
    """Seed 23's case: every sample landed just over the budget, only knockouts met it."""
    budget = Budget(100.0, 0.05)
    # per-head log-cost of the samples: ln(1.0506)/11 = 0.0045, ln(1.0506)/14 = 0.0035, ln(1.08)/16 = 0.0048: median the first
    rows = [big(0, 100.0), big(1, 101.0), big(11, 105.06), big(14, 105.06), big(16, 108.0)]
    assert largest_feasible(rows, budget) == 1  # only the knockout
    k = math.log(1.05) / (math.log(1.0506) / 11)
    assert fitting_count(rows, budget) == (pytest.approx(k), True)  # AP's log then names the fallback
    assert budget_count(rows, budget) == pytest.approx(k)
    assert trust_region(rows, budget, 1, 32) == (1, math.ceil(1.25 * k)) == (1, 14)  # the old rule gave 2
    # never above the largest count evaluated (the surrogates know nothing beyond it)
    cheap = [big(0, 100.0), big(2, 101.0), big(3, 101.0)]  # the median cost alone would say 11.8 heads
    assert budget_count(cheap, budget) == 3.0
    assert budget_count([big(0, 100.0), big(1, 101.0)], budget) == 0.0  # no multi-head mask: nothing to say
    assert trust_region([big(0, 100.0), big(1, 101.0)], budget, 1, 32) == (1, 2)
    assert fitting_count([big(0, 100.0), big(1, 101.0)], budget) == (1, False)  # no estimate: the log stays silent
    assert fitting_count([big(0, 100.0), big(8, 104.9)], budget) == (8, False)


# ---------------------------------------------------------------------------------------
# --trim: an over-budget search candidate cut down along nested sub-masks
# ---------------------------------------------------------------------------------------

def additive(bias_of: dict, lp_of: dict, shape=(2, 4)):
    """A surrogate (states -> bias, log-perplexity) that adds each pruned head's effect."""
    import torch

    b = torch.zeros(shape[0] * shape[1])
    lp = torch.zeros(shape[0] * shape[1])
    for (l, h), v in bias_of.items():
        b[l * shape[1] + h] = v
    for (l, h), v in lp_of.items():
        lp[l * shape[1] + h] = v

    def predict(states):
        pruned = 1 - states
        return 1.0 + pruned @ b, pruned @ lp

    return predict


def test_the_trim_path_restores_harmful_heads_first_then_the_least_bias_per_perplexity():
    from attnprune.methods.ap import removal_path

    good, dear, harmful, weak = (0, 0), (0, 1), (1, 0), (1, 1)
    predict = additive({good: -1.0, dear: -1.0, harmful: 0.5, weak: -0.1},
                       {good: 0.01, dear: 0.04, harmful: 0.01, weak: 0.03})
    mask = HeadMask.from_pruned(2, 4, [good, dear, harmful, weak])
    path, lps = removal_path(mask, predict)
    # restored in turn: the head whose pruning raises bias, then 0.1 / 0.03 < 1 / 0.04 < 1 / 0.01
    assert [sorted(m.pruned) for m in path] == [[good], [good, dear], [good, dear, weak]]
    assert lps == pytest.approx([0.01, 0.05, 0.08, 0.09])


def test_the_trim_guess_scales_the_path_to_the_confirmed_change_and_leaves_the_bound_margin():
    from attnprune.methods.ap import trim_guess

    predicted = [0.005 * i for i in range(1, 11)]  # a 10-head candidate, the surrogate's change along its path
    # confirmed +6% (bound +8%): the sizes whose scaled change is within log(1.05) - log(1.08 / 1.06)
    room = math.log(1.05) - math.log(1.08 / 1.06)
    expected = max(i for i in range(1, 10) if math.log(1.06) * i / 10 <= room)
    assert trim_guess(predicted, 0.06, 0.08, 0.05) == expected == 5
    assert trim_guess(predicted, 0.06, 0.2, 0.05) == 1  # a margin over the budget: the smallest size
    assert trim_guess([0.0] * 10, 0.06, 0.08, 0.05) == 5  # no predicted cost: the middle of the path


def trim_context(admissible_up_to: int, probed: list):
    """A method context whose confirmation admits a sub-mask of at most ``admissible_up_to`` heads."""
    import contextlib
    import types

    from attnprune.selection import Selection

    policy = SelectionPolicy(tau=0.05, penalty=1.0, confirm=6)
    base = row([], 1.0, 100.0)

    def confirmed(r):
        n = r.mask.n_pruned
        change = 0.006 * n
        return ConfirmedCandidate(pruned=[list(p) for p in r.mask.pruned], source=r.source, valid_bias=r.bias,
                                  valid_perplexity=r.perplexity, confirmed_bias=0.5, confirmed_perplexity_change=change,
                                  confirmed_perplexity_change_bound=change + 0.02, admissible=n <= admissible_up_to)

    def select(rows, source):
        (r,) = rows
        return Selection(None, None, base, [confirmed(r)], shortlist=[r.mask])

    def evaluate(masks, source, desc):
        probed.append(masks[0].n_pruned)
        return [row(m.pruned, 1.0 - 0.05 * m.n_pruned, 100.0 + m.n_pruned) for m in masks]

    return types.SimpleNamespace(options=types.SimpleNamespace(trim=1), policy=policy, cells=8, select=select,
                                 evaluate=evaluate, timed=lambda stage: contextlib.nullcontext(), log=lambda m: None)


@pytest.mark.parametrize("admissible_up_to, probes", [(5, [5, 6]), (3, [5, 4, 2, 3]), (7, [5, 6, 7])])
def test_a_trim_confirms_the_largest_admissible_sub_mask_in_a_few_probes(monkeypatch, admissible_up_to, probes):
    from attnprune.methods.ap import AttentionPruning, Surrogates
    from attnprune.results import SearchDetails

    heads = [(0, h) for h in range(4)] + [(1, h) for h in range(4)]
    over = dataclasses.replace(row(heads, 0.3, 110.0), source="candidate-r4")  # 8 heads, confirmed +4.8% (bound +6.8%)
    worse = dataclasses.replace(row(heads[:7], 0.4, 109.0), source="candidate-r4")  # trimmed only with --trim 2
    design = dataclasses.replace(row(heads[:1], 0.2, 101.0), source="knockout")  # not a search candidate
    probed: list[int] = []
    ctx = trim_context(admissible_up_to, probed)
    ap = AttentionPruning()
    monkeypatch.setattr(ap, "training_data", lambda ctx, before_round=None: [over, worse, design])
    monkeypatch.setattr(ap, "fit", lambda ctx, r: Surrogates(additive({}, {h: 0.005 for h in heads}), {}))
    details = SearchDetails()
    kept = ap.trim(ctx, 5, frozenset(r.mask.key for r in (over, worse, design)), details)
    (t,) = details.trim
    assert probed == probes and [p.heads for p in t.probes] == probes
    assert t.heads == 8 and t.kept == admissible_up_to
    # every admissible probe is kept for the choice, the largest among them
    assert {HeadMask.from_key(k, 2, 4).n_pruned for k in kept} == {p for p in probes if p <= admissible_up_to}
    assert [p.admissible for p in t.probes] == [p <= admissible_up_to for p in probes]
    # --trim-when better's bar: a candidate not below the choice's search bias is not cut
    assert ap.trim(ctx, 5, frozenset([over.mask.key]), details, below=over.bias) == frozenset()
    assert len(details.trim) == 1
