"""Signal quality of the search's measurements and surrogates, in the regime the search chooses from.

The benchmark that decides the repair's defaults. On the default model (SmolLM2-135M,
gender_and_sex, likelihood bias, seed 0) it measures, for masks where the perplexity budget
can hold:

1. **Bias measurement**: for each prompt count (nested stratified subsets of the
   validation split), the rank agreement across masks between two *disjoint* validation
   subsets of that size (split-half reliability: what the search can rely on) and with the
   held-out test split (1,122 prompts), with the seconds one evaluation costs.
2. **Perplexity**: the change in perplexity against the unrepaired model on 1,020 / 2,040
   / all 5,610 validation tokens, against the test change (4,080 tokens): rank agreement,
   mean under-estimate, how often a mask within +5% on validation exceeds it on test, and
   how often an upper confidence bound from the per-window spread covers the test change.
3. **Surrogates inside the regime**: the additive model (knockout effects on the bucket
   means and on log-perplexity, with and without empirical-Bayes shrinkage, from knockouts
   on 181 / about 360 / 540 / 1,087 prompts), the first-order (gate-gradient) estimate of the
   same effects, and the paper's MLP / ridge (5-fold CV on the regime masks), scored by
   Spearman with each mask's measured bias on fresh validation prompts (never used by any
   fit) and on test.

Data: ``benchmarks/sq_collect.py`` evaluates, once, the unrepaired model, the 270
single-head knockouts (1,087 validation prompts, all validation perplexity text) and 40
masks of 2-20 heads (uniform, from low-perplexity-cost heads, and annealing candidates on
the knockout model) on 2,147 validation prompts, all validation text, 1,122 test prompts
and all test text; this script only reads them (``runs/signal_quality/seed0``).
Writes ``benchmarks/results/signal_quality.json``.

    .venv/bin/python benchmarks/sq_collect.py        # slow: about 2 h on 2 cores, resumable
    .venv/bin/python benchmarks/signal_quality.py    # minutes

RETIRED AS EVIDENCE: this study measures seed 0's test split (its masks are picked by test
perplexity, its rankings scored valid -> test), so nothing may be chosen from it. Its result
file was removed; before it is rerun it must compare two disjoint *validation* parts
instead (see the README's "Results" section).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from attnprune.data import holisticbias as hb
from attnprune.data.packaged import rank
from attnprune.stats import BucketDesign, bias_from_means
from common import write

DATA = Path(__file__).resolve().parent.parent / "runs" / "signal_quality" / "seed0"
TAU = 0.05
COUNTS = (160, 320, 640, 1000)


def rho(a, b) -> float:
    return float(spearmanr(a, b).statistic)


def load():
    meta = json.loads((DATA / "meta.json").read_text())
    z = {name: np.load(DATA / f"{name}.npz") for name in ("base", "knockouts", "regime")}
    sources = json.loads((DATA / "regime_sources.json").read_text())
    attribution = np.load(DATA / "attribution.npz") if (DATA / "attribution.npz").is_file() else None
    return meta, z, sources, attribution


def design_for(meta_rows, shares, adjust="template") -> BucketDesign:
    return BucketDesign([r[1] for r in meta_rows], shares, [r[2] for r in meta_rows] if adjust == "template" else None)


def index_of(rows, texts) -> np.ndarray:
    pos = {r[0]: i for i, r in enumerate(rows)}
    return np.array([pos[t] for t in texts])


def nested(n: int, seed: int = 0) -> list[str]:
    """Texts of the repair's nested stratified validation subset of about ``n`` prompts."""
    return [p.text for p in hb.subset("gender_and_sex", "valid", n, seed)]


def halves(rows) -> tuple[list[int], list[int]]:
    """Two disjoint halves of ``rows`` (indices), alternating within each bucket in a seeded order."""
    a, b = [], []
    for bucket in sorted({r[1] for r in rows}):
        members = sorted((i for i, r in enumerate(rows) if r[1] == bucket), key=lambda i: rank(rows[i][0], "half"))
        a += members[0::2]
        b += members[1::2]
    return a, b


def take(rows, pool: list[int], n: int) -> np.ndarray:
    """About ``n`` prompts of ``pool``, allocated to buckets as the repair's subsets are (proportional, with a floor)."""
    by_bucket: dict[str, list[int]] = {}
    for i in pool:
        by_bucket.setdefault(rows[i][1], []).append(i)
    total = len(pool)
    floor = max(4, n // (2 * len(by_bucket)))
    out = []
    for bucket, members in sorted(by_bucket.items()):
        out += members[: min(len(members), max(floor, round(n * len(members) / total)))]
    return np.array(out)


def main() -> None:
    meta, z, sources, attribution = load()
    v2, te, v1 = meta["v2000"], meta["test1000"], meta["v1000"]
    shares = meta["shares_valid"]
    base, knock, reg = z["base"], z["knockouts"], z["regime"]
    tok_v, tok_t = meta["ppl_valid"]["window"] - 1, meta["ppl_test"]["window"] - 1
    kinds = [sources[k] for k in reg["keys"]]
    res: dict = {"setup": {"model": "smollm2-135m", "axis": "gender_and_sex", "measure": "likelihood", "seed": 0,
                           "regime_masks": len(kinds), "kinds": {k: kinds.count(k) for k in set(kinds)},
                           "valid_prompts": len(v2), "test_prompts": len(te)}}

    # ---- regime: masks whose test perplexity change is within the budget (where choices are made)
    base_tppl = base["ppl_test"][0][:16].sum() / (16 * tok_t)
    reg_tppl = reg["ppl_test"][:, :16].sum(1) / (16 * tok_t)
    test_change = np.exp(reg_tppl - base_tppl) - 1
    inside = test_change <= TAU
    res["setup"]["inside_budget_on_test"] = int(inside.sum())
    d_te = design_for(te, meta["shares_test"])
    test_bias = d_te.bias(reg["test1000"])
    res["setup"]["test_bias_unrepaired"] = float(d_te.bias(base["test1000"][0]))

    # ---- 1. bias measurement: split-half reliability and valid->test agreement per prompt count
    rows = []
    half_a, half_b = halves(v2)
    for adjust in ("template", "none"):
        bt = design_for(te, meta["shares_test"], adjust).bias(reg["test1000"])
        for n in COUNTS:
            ia, ib = take(v2, half_a, n), take(v2, half_b, n)
            da, db = design_for([v2[i] for i in ia], shares, adjust), design_for([v2[i] for i in ib], shares, adjust)
            ba, bb = da.bias(reg["v2000"][:, ia]), db.bias(reg["v2000"][:, ib])
            rows.append({"adjust": adjust, "prompts": int(len(ia)), "split_half_all": rho(ba, bb),
                         "split_half_regime": rho(ba[inside], bb[inside]), "valid_test_all": rho(ba, bt),
                         "valid_test_regime": rho(ba[inside], bt[inside])})
        full = design_for(v2, shares, adjust).bias(reg["v2000"])
        rows.append({"adjust": adjust, "prompts": len(v2), "split_half_all": None, "split_half_regime": None,
                     "valid_test_all": rho(full, bt), "valid_test_regime": rho(full[inside], bt[inside])})
    res["bias_measurement"] = rows
    for r in rows:
        print(f"bias ({r['adjust']:8s}) {r['prompts']:5d} prompts: split-half {r['split_half_regime'] or float('nan'):+.2f} "
              f"(all {r['split_half_all'] or float('nan'):+.2f}), valid->test {r['valid_test_regime']:+.2f} "
              f"(all {r['valid_test_all']:+.2f})")

    # ---- 2. perplexity: change on validation text vs test text
    ppl_rows = []
    bv = base["ppl_valid"][0]
    for windows in (4, 8, 11, 22):
        change = np.exp((reg["ppl_valid"][:, :windows].sum(1) - bv[:windows].sum()) / (windows * tok_v)) - 1
        diffs = (reg["ppl_valid"][:, :windows] - bv[:windows]) / tok_v  # per-window mean NLL change
        se = diffs.std(axis=1, ddof=1) / np.sqrt(windows)
        ucb = np.exp(diffs.mean(1) + 1.645 * se) - 1
        ppl_rows.append({
            "tokens": windows * tok_v, "spearman_with_test_all": rho(change, test_change),
            "spearman_with_test_near_budget": rho(change[test_change < 0.15], test_change[test_change < 0.15]),
            "mean_test_minus_valid": float(np.mean(test_change - change)),
            "within_budget_on_valid_but_over_on_test": int(((change <= TAU) & (test_change > TAU)).sum()),
            "within_budget_on_valid": int((change <= TAU).sum()),
            "ucb90_within_budget_but_over_on_test": int(((ucb <= TAU) & (test_change > TAU)).sum()),
            "ucb90_within_budget": int((ucb <= TAU).sum()),
            "ucb90_covers_test": float(np.mean(test_change <= ucb)),
        })
    res["perplexity"] = ppl_rows
    for r in ppl_rows:
        print(f"ppl {r['tokens']:5d} valid tokens: Spearman with test {r['spearman_with_test_all']:+.2f}, test - valid "
              f"{100 * r['mean_test_minus_valid']:+.2f} pts, in budget on valid but not test "
              f"{r['within_budget_on_valid_but_over_on_test']}/{r['within_budget_on_valid']}; UCB90 rule "
              f"{r['ucb90_within_budget_but_over_on_test']}/{r['ucb90_within_budget']}, covers {r['ucb90_covers_test']:.2f}")

    # ---- 0. single-head knockout effects: how reliable, and how well a first-order estimate finds them
    res["knockouts"] = knockout_reliability(meta, base, knock, attribution, shares, tok_v)

    # ---- 3. surrogates inside the regime
    fresh = index_of(v2, sorted({r[0] for r in v2} - {r[0] for r in v1}))
    d_fresh = design_for([v2[i] for i in fresh], shares)
    fresh_bias = d_fresh.bias(reg["v2000"][:, fresh])
    res["setup"]["fresh_prompts"] = int(len(fresh))
    k_scores, b_scores = knock["v1000"], base["v1000"][0]
    bits = np.array([[c == "1" for c in np.unpackbits(np.frombuffer(bytes.fromhex(k), dtype=np.uint8))[:270].astype(str)]
                     for k in reg["keys"]], dtype=float)
    pruned = 1.0 - bits
    lp0_v = bv.sum() / (22 * tok_v)
    dlp_k = knock["ppl_valid"].sum(1) / (22 * tok_v) - lp0_v
    meas_lp_change = reg["ppl_valid"].sum(1) / (22 * tok_v) - lp0_v
    surr = []

    def score(name, pred_bias, pred_lp=None, extra=None):
        row = {"surrogate": name, "fresh_valid_regime": rho(pred_bias[inside], fresh_bias[inside]),
               "test_regime": rho(pred_bias[inside], test_bias[inside]), "fresh_valid_all": rho(pred_bias, fresh_bias),
               "test_all": rho(pred_bias, test_bias)}
        if pred_lp is not None:
            row["log_ppl_valid_all"] = rho(pred_lp, meas_lp_change)
            row["log_ppl_test_all"] = rho(pred_lp, np.log1p(test_change))
        row.update(extra or {})
        surr.append(row)
        print(f"{name:36s} bias: fresh valid {row['fresh_valid_regime']:+.2f} test {row['test_regime']:+.2f} "
              f"(all masks {row['fresh_valid_all']:+.2f} / {row['test_all']:+.2f})"
              + (f"; log-ppl {row['log_ppl_valid_all']:+.2f} / test {row['log_ppl_test_all']:+.2f}" if pred_lp is not None else ""))

    for n in (160, 320, 480, 1000):
        idx = index_of(v1, nested(n))
        d = design_for([v1[i] for i in idx], shares)
        mu0 = d.means(b_scores[idx])
        mu_k = d.means(k_scores[:, idx])
        delta = mu_k - mu0
        # sampling variance of each knockout's bucket-mean shift: projection of the per-prompt differences
        diffs = k_scores[:, idx] - b_scores[idx]
        var = (diffs - diffs.mean(1, keepdims=True)) ** 2 @ (d.projection ** 2).T
        for shrink in (False, True):
            D = delta
            if shrink:
                signal = np.maximum(delta.var(axis=0) - var.mean(axis=0), 0)
                D = delta * signal / (signal + var)
            # base means from the same prompts (what a search on these prompts sees) or from all 2,147
            pred = bias_from_means(mu0 + pruned @ D, d.weights)
            score(f"additive, knockouts on {len(idx)} prompts{', EB-shrunk' if shrink else ''}", pred,
                  pruned @ dlp_k, {"knockout_prompts": int(len(idx)), "shrink": shrink})
    if attribution is not None:
        g = attribution["bias_grad"]  # [prompts, L, H], d score / d gate, v1000 order
        d = design_for(v1, shares)
        D = -(d.projection @ g.reshape(len(v1), -1)).T  # removing a head ~ minus its gate gradient
        mu0 = d.means(b_scores)
        pg = attribution["ppl_grad"].reshape(attribution["ppl_grad"].shape[0], -1).sum(0)
        E = -pg / (22 * tok_v)
        score("first-order (gate gradients), all heads", bias_from_means(mu0 + pruned @ D, d.weights), pruned @ E)
        delta_k = d.means(k_scores) - mu0
        res["attribution_vs_knockouts"] = {
            "bucket_shift_spearman": rho(D.reshape(-1), delta_k.reshape(-1)),
            "log_ppl_spearman": rho(E, dlp_k), "log_ppl_pearson": float(np.corrcoef(E, dlp_k)[0, 1]),
        }
        print("first-order vs knockouts:", res["attribution_vs_knockouts"])
    # the paper's surrogates, 5-fold CV on the regime masks themselves
    from attnprune.surrogate import MLPSurrogate, RidgeSurrogate

    full_bias = design_for(v2, shares).bias(reg["v2000"])
    for name, make in (("MLP (paper), CV on the regime masks", lambda: MLPSurrogate(seed=0)),
                       ("ridge, CV on the regime masks", lambda: RidgeSurrogate())):
        from sklearn.model_selection import KFold

        pred = np.empty(len(full_bias))
        for tr, ts in KFold(5, shuffle=True, random_state=0).split(bits):
            pred[ts] = make().fit(bits[tr], full_bias[tr]).predict(bits[ts])
        score(name, pred)
    res["surrogates"] = surr
    res["cost_s_per_evaluation"] = cost()
    write("signal_quality", res)


def knockout_reliability(meta, base, knock, attribution, shares, tok_v) -> dict:
    """Split-half reliability of the knockouts' bucket-mean shifts and log-perplexity effects; first-order agreement."""
    v1 = meta["v1000"]
    out = {}
    a, b = halves(v1)
    shifts = []
    for half in (a, b):
        d = design_for([v1[i] for i in half], shares)
        shifts.append(d.means(knock["v1000"][:, half]) - d.means(base["v1000"][0][half]))
    out["bucket_shift_split_half_pearson"] = float(np.corrcoef(shifts[0].reshape(-1), shifts[1].reshape(-1))[0, 1])
    d = design_for(v1, shares)
    mu0 = d.means(base["v1000"][0])
    delta = d.means(knock["v1000"]) - mu0
    bias0 = float(bias_from_means(mu0, d.weights))
    change = bias_from_means(mu0 + delta, d.weights) - bias0
    halves_change = [bias_from_means(d2.means(base["v1000"][0][h]) + s, d2.weights) - bias_from_means(
        d2.means(base["v1000"][0][h]), d2.weights) for s, h, d2 in
        ((shifts[0], a, design_for([v1[i] for i in a], shares)), (shifts[1], b, design_for([v1[i] for i in b], shares)))]
    out["knockout_bias_change_split_half_spearman"] = rho(*halves_change)
    lp = [knock["ppl_valid"][:, w].sum(1) / (len(w) * tok_v) - base["ppl_valid"][0][w].sum() / (len(w) * tok_v)
          for w in (np.arange(0, 11), np.arange(11, 22))]
    out["log_ppl_effect_split_half_spearman"] = rho(*lp)
    out["heads_lowering_bias_alone"] = int((change < 0).sum())
    out["knockout_bias_change_quantiles"] = np.percentile(change / bias0, [5, 25, 50, 75, 95]).tolist()
    dlp = knock["ppl_valid"].sum(1) / (22 * tok_v) - base["ppl_valid"][0].sum() / (22 * tok_v)
    out["knockout_ppl_change_quantiles"] = np.expm1(np.percentile(dlp, [5, 25, 50, 75, 95])).tolist()
    if attribution is not None:
        g = attribution["bias_grad"].reshape(len(v1), -1)
        D = -(d.projection @ g).T
        E = -attribution["ppl_grad"].reshape(attribution["ppl_grad"].shape[0], -1).sum(0) / (22 * tok_v)
        first_change = bias_from_means(mu0 + D, d.weights) - bias0
        out["first_order"] = {
            "bucket_shift_pearson": float(np.corrcoef(D.reshape(-1), delta.reshape(-1))[0, 1]),
            "bias_change_spearman": rho(first_change, change), "log_ppl_spearman": rho(E, dlp),
        }
        # as a screen: of the heads whose knockout lowers bias most per unit of perplexity, how many does
        # the first-order estimate keep when it keeps half of the heads?
        useful = np.argsort(change / np.maximum(dlp, 1e-4) * (change < 0))[:30]
        kept = np.argsort(first_change / np.maximum(E, 1e-4) * (first_change < 0))[: len(change) // 2]
        out["first_order"]["recall_of_30_best_when_keeping_half"] = len(set(useful) & set(kept)) / 30
    print("knockouts:", json.dumps(out, indent=None)[:600])
    return out


def cost() -> dict:
    """Seconds of one likelihood evaluation (one random 6-head mask) per prompt count, and perplexity per token count."""
    from attnprune import HeadMask, load_model
    from attnprune.backend import Backend
    from attnprune.measures import get_measure

    lm = load_model("smollm2-135m")
    mask = HeadMask.from_pruned(*lm.layout.shape, [(3, 1), (8, 4), (12, 0), (17, 6), (21, 2), (26, 8)])
    out = {}
    with Backend(lm) as backend:
        for n in COUNTS + (2000,):
            m = get_measure("likelihood", prompts=n, bootstrap_reps=200).prepare(backend)
            m.score([mask])  # caches
            t = time.perf_counter()
            m.score([mask])
            out[f"likelihood_{len(m.prompts_)}_prompts"] = time.perf_counter() - t
        for tokens in (1024, 2048, 4096, 10**6):
            m = get_measure("perplexity", max_tokens=tokens).prepare(backend)
            m.score([mask])
            t = time.perf_counter()
            m.score([mask])
            out[f"perplexity_{m.describe()['tokens_scored']}_tokens"] = time.perf_counter() - t
    print("seconds per evaluation:", {k: round(v, 2) for k, v in out.items()})
    return out


if __name__ == "__main__":
    main()
