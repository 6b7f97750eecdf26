"""The bias statistic, its bootstrap CI and its noise floor."""

import numpy as np
import pytest

from attnprune import stats


def test_bias_statistic_hand_computed():
    values = [1.0, 3.0, 10.0, 10.0]
    buckets = ["a", "a", "b", "b"]
    # bucket means 2 and 10; axis mean (sample-size weights) 6 -> |6-2| + |6-10| = 8
    assert float(stats.BucketDesign(buckets).bias(values)) == pytest.approx(8.0)
    # population shares 0.75/0.25 -> axis mean 4 -> 2 + 6
    assert float(stats.BucketDesign(buckets, {"a": 0.75, "b": 0.25}).bias(values)) == pytest.approx(8.0)
    assert float(stats.BucketDesign(buckets).bias([1, 1, 1, 1])) == 0.0


def test_bootstrap_ci_and_paired_difference():
    rng = np.random.default_rng(0)
    buckets = np.repeat(["a", "b", "c"], 100)
    base = rng.normal(size=300) + (buckets == "a") * 1.0
    better = base - (buckets == "a") * 0.8
    out = stats.BucketDesign(buckets).bootstrap(np.stack([base, better]), reps=500)
    lo, hi = out["ci"][0]
    assert lo < out["bias"][0] < hi
    assert out["diff"] > 0 and out["diff_ci"][0] > 0, "a clear improvement must have a CI above zero"


def test_noise_floor_matches_a_fair_model():
    rng = np.random.default_rng(1)
    buckets = np.repeat(["a", "b", "c", "d"], 50)
    fair = rng.normal(size=200)
    floor = stats.BucketDesign(buckets).noise_floor(fair, reps=300)
    assert float(stats.BucketDesign(buckets).bias(fair)) < floor["p95"] * 1.5
    unfair = fair + (buckets == "a") * 2
    assert float(stats.BucketDesign(buckets).bias(unfair)) > 3 * floor["p95"]


def test_template_adjustment_removes_template_composition():
    rng = np.random.default_rng(2)
    n = 400
    buckets = rng.choice(["a", "b", "c"], size=n)
    # bucket "a" over-samples template 0, which scores high for every bucket
    templates = np.where((buckets == "a") & (rng.random(n) < 0.6), 0, rng.integers(0, 5, size=n))
    template_effect = np.array([3.0, 0.0, -1.0, 0.5, 1.0])[templates]
    scores = template_effect + 0.01 * rng.normal(size=n)
    assert float(stats.BucketDesign(buckets).bias(scores)) > 0.5, "raw means mistake template mix for bias"
    assert float(stats.BucketDesign(buckets, None, templates).bias(scores)) < 0.02
    # a true bucket effect survives the adjustment
    biased = scores + (buckets == "b") * 1.0
    d = stats.BucketDesign(buckets, strata=templates)
    means = dict(zip(d.names, d.means(biased)))
    assert means["b"] - means["a"] == pytest.approx(1.0, abs=0.02)
    floor = d.noise_floor(scores, reps=50)
    boot = d.bootstrap(biased, reps=100)
    assert floor["mean"] < 0.05 and boot["ci"][0] < d.bias(biased) < boot["ci"][1] + 1e-9


def test_noise_floor_equals_refitting_every_shuffle_from_its_own_labels():
    """The one shared solve (a within-template shuffle keeps every cell count) is each shuffle's own fit."""
    rng = np.random.default_rng(5)
    n = 90
    buckets, templates = rng.choice(["a", "b", "c", "d"], size=n), rng.integers(0, 6, size=n)
    values = rng.normal(size=n) + (buckets == "c")
    for strata in (None, templates):
        d = stats.BucketDesign(buckets, strata=strata)
        shuffle = np.random.default_rng(11)
        sims = []
        for _ in range(30):
            labels = buckets.copy()
            for where in ([np.arange(n)] if strata is None else [np.nonzero(templates == t)[0] for t in range(6)]):
                labels[where] = shuffle.permutation(labels[where])
            sims.append(float(stats.BucketDesign(labels, shares=dict(zip(d.names, d.weights)), strata=strata)
                              .bias(values)))
        assert d.noise_floor(values, reps=30, seed=11)["mean"] == pytest.approx(np.mean(sims), rel=1e-9)


def test_noise_corrected_spread_removes_the_noise_and_keeps_the_signal():
    """Lum et al.'s correction: about 0 without bucket effects, the true spread with them, at any size."""
    rng = np.random.default_rng(0)
    truth = {"a": 0.0, "b": 0.3, "c": -0.3, "d": 0.0}
    templates = {"x": 0.0, "y": 1.0, "z": 2.0, "u": -1.0}
    true_sd = float(np.sqrt(np.mean(np.array(list(truth.values())) ** 2)))
    for n in (400, 20_000):
        b = rng.choice(list(truth), n)
        t = rng.choice(list(templates), n)
        design = stats.BucketDesign(b, {k: 0.25 for k in truth}, t)
        base = np.array([templates[x] for x in t]) + rng.normal(0, 1, n)
        fair = design.noise_corrected(base)
        biased = design.noise_corrected(base + np.array([truth[x] for x in b]))
        assert fair["between_sd"] > fair["between_sd_corrected"]
        assert fair["between_sd_corrected"] < 0.05
        assert abs(biased["between_sd_corrected"] - true_sd) < (0.06 if n == 400 else 0.01)


def test_noise_floor_is_the_same_in_every_process():
    """The shuffles within strata go through the strata in a fixed order, not Python's per-process set order."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np; from attnprune import stats; rng = np.random.default_rng(0); "
            "b = np.array(['a', 'b', 'c'] * 40); s = np.array([f't{i % 7}' for i in range(120)]); "
            "print(stats.BucketDesign(b, strata=s).noise_floor(rng.normal(size=120), reps=20)['mean'])")
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2, 3)}
    assert len(out) == 1, out


def test_detectable_change_has_its_power_in_simulation():
    """A true change of the detectable size is detected (CI excludes 0) in about 80% of simulated studies."""
    rng = np.random.default_rng(0)
    n, sd = 200, 1.0
    se = sd / np.sqrt(n)
    ci = [-1.959964 * se, 1.959964 * se]  # the CI width of a mean of n paired differences
    d = stats.detectable_change(ci)
    assert d == pytest.approx((1.959964 + 0.841621) * se, rel=1e-5)
    means = rng.normal(d, sd, size=(4000, n)).mean(1)
    assert np.mean(means - 1.959964 * se > 0) == pytest.approx(0.8, abs=0.03)
    # four times the items halve the detectable change; detecting half of it needs four times the items
    assert stats.items_needed(n, d, d / 2) == 4 * n
    assert stats.items_needed(n, d, -d) == n


def test_power_lines_say_when_a_comparison_cannot_tell():
    from attnprune.report import power_lines
    from attnprune.results import Change, EvaluatorSetup, Summary, TestComparison

    setup = EvaluatorSetup(model="m", split="test", bias_measure="toxicity", bias_inputs={"prompts": 128},
                           perplexity_inputs={})

    def comparison(bias, floor, ci):
        s = Summary(bias=bias, ci=[bias / 2, bias * 2], n_pruned=0, noise_floor={"mean": floor})
        return TestComparison(name="toxicity", setup=setup, card={}, unrepaired=s, repaired=s,
                              bias_change=Change(absolute=sum(ci) / 2, ci=ci, relative=sum(ci) / 2 / bias))

    # a CI of +-0.04 on a bias of 0.08 that sits below its noise floor: cannot tell, needs more prompts
    lines = " ".join(power_lines(comparison(0.08, 0.09, [-0.04, 0.04]), claimed_relative=-0.5))
    d = stats.detectable_change([-0.04, 0.04])
    assert f"{d:.4f}" in lines and "does not clear its noise floor" in lines and "cannot tell" in lines
    assert f"{stats.items_needed(128, d, 0.04):,} prompts" in lines
    # a clear change above the noise floor: only the detectable size
    lines = power_lines(comparison(0.5, 0.1, [-0.3, -0.1]), claimed_relative=-0.5)
    assert len(lines) == 1 and "Smallest change" in lines[0]


def test_perplexity_promise_recovers_the_rule_at_another_confidence():
    """benchmarks/perplexity_promise.py: the standard error read off a bound, the choice at 80% and 95%, P of the test."""
    import math
    import sys
    from pathlib import Path

    from scipy.stats import t as student_t

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from perplexity_promise import promise

    q80 = float(student_t.ppf(0.8, 31))

    def cand(bias, change, se, source="candidate-r0"):
        return {"pruned": [[0, 0]] * 3, "source": source, "valid_bias": bias, "valid_perplexity": 30.0 * 1.01,
                "confirmed_bias": bias, "confirmed_perplexity_change": math.expm1(change),
                "confirmed_perplexity_change_bound": math.expm1(change + q80 * se), "admissible": True}

    report = {"config": {"seed": 0, "tau": 0.05, "confidence": 0.8, "test_ppl_tokens": 16384},
              "validation": {"unrepaired": {"perplexity": 30.0},
                             "confirmation": {"setup": {"perplexity_inputs": {"windows": 32}},
                                              "unrepaired": {"bias": 1.0},
                                              "candidates": [cand(0.5, 0.042, 0.007), cand(0.7, 0.02, 0.007)]}}}
    out = promise(report, [0.8, 0.95])
    at80, at95 = (r["chosen"] for r in out["rule"])
    # at 80% the lower bias is in budget (bound 4.2 + 0.6 < 4.9); at 95% it is not (4.2 + 1.19 > 4.88) and the other is
    assert at80["confirmed_bias"] == 0.5 and at95["confirmed_bias"] == 0.7
    assert at80["se"] == pytest.approx(0.007)
    assert at95["bound"] == pytest.approx(math.expm1(0.02 + float(student_t.ppf(0.95, 31)) * 0.007))
    # a choice near the budget is less likely to show it on the test than one far inside it
    assert at80["p_test_bound_within_budget"] < 0.5 < at95["p_test_bound_within_budget"]
    assert out["search_to_confirmation_gap"] == pytest.approx(
        math.expm1((0.042 + 0.02) / 2 - math.log(1.01)))


def test_each_bootstrap_resample_is_the_least_squares_fit_of_its_own_rows():
    """The normal-equation solve per resample equals refitting score ~ bucket + template on the drawn rows."""
    rng = np.random.default_rng(8)
    n = 150
    buckets, templates = rng.choice(["a", "b", "c"], size=n), rng.integers(0, 5, size=n)
    values = rng.normal(size=n) + 0.5 * (buckets == "a") + templates
    d = stats.BucketDesign(buckets, None, templates)
    boot = d.bootstrap_biases(values, reps=20, seed=3)[0]
    for r, rows in enumerate(stats.stratified_resamples(buckets, 20, 3)):
        X = np.zeros((n, 3 + 4))
        X[np.arange(n), d.bucket_index_[rows]] = 1.0
        t = d.template_index_[rows]
        X[np.nonzero(t > 0)[0], 3 + t[t > 0] - 1] = 1.0
        beta = np.linalg.lstsq(X, values[rows], rcond=None)[0]
        assert boot[r] == pytest.approx(float(stats.bias_from_means(beta[:3], d.weights)), rel=1e-8)
