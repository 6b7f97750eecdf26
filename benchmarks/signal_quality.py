"""Signal quality of the search's measurements and surrogates, in the regime the search chooses from.

The benchmark that decides the repair's defaults, so it reads VALIDATION data only: what a
search sees (the *search half* of the validation prompts and text) against an independent
measurement of the same masks on the *confirmation half* (disjoint prompts and text, the
half a repair confirms on). No test split is read; only development seeds (0-2) run. On
the default model (SmolLM2-135M, gender_and_sex, likelihood bias) it measures, for masks
where the perplexity budget can hold on the held half:

1. **Bias measurement**: for each prompt count (stratified subsets of the search half),
   the rank agreement across masks between two disjoint subsets of that size (split-half
   reliability) and with the held half (about 1,000 prompts), with the seconds one
   evaluation costs.
2. **Perplexity**: the change against the unrepaired model on the first 4 / 8 / 16 / all
   windows of the search half's text, against the held half's change: rank agreement,
   mean under-estimate, how often a mask within +5% on the search text exceeds it on the
   held text, and how often an upper bound from the per-window spread covers the held
   change.
3. **Surrogates inside the regime**: the additive model (knockout effects on the bucket
   means and on log-perplexity, with and without empirical-Bayes shrinkage, from knockouts
   on 160-1,000 prompts), the first-order (gate-gradient) estimate of the same effects when
   ``attribution.npz`` is there, and the paper's MLP / ridge (5-fold CV on the regime
   masks), scored by Spearman with each mask's measured bias on fresh search-half prompts
   (never used by any fit) and on the held half.

Data: ``benchmarks/sq_collect.py --seed S`` evaluates, once, the unrepaired model, every
single-head knockout and about 60 masks of 2-20 heads (uniform, from low-perplexity-cost
heads, and annealing candidates on the knockout model); this script only reads them
(``runs/signal_quality/valid-seed<S>``). Writes ``benchmarks/results/signal_quality.json``.

    .venv/bin/python benchmarks/sq_collect.py --seed 0        # slow: hours on 2 cores, resumable
    .venv/bin/python benchmarks/signal_quality.py --seed 0    # minutes

Earlier versions scored against seed 0's test split; their results were withdrawn and the
defaults they chose are marked as such in the README. Results of this version have not
been collected yet.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from attnprune.data import holisticbias as hb
from attnprune.data.packaged import rank
from attnprune.stats import BucketDesign, bias_from_means
from common import write

ROOT = Path(__file__).resolve().parent.parent / "runs" / "signal_quality"
DATA = ROOT / "valid-seed0"  # set by --seed
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
    """Texts of the repair's stratified subset of about ``n`` prompts of the validation search half."""
    return [p.text for p in hb.subset("gender_and_sex", "valid", n, seed, part="search")]


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


def per_window_tokens(described: dict) -> float:
    """Scored tokens per window of a perplexity text (from its ``describe()``)."""
    return described["tokens_scored"] / described["windows"]


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0, help="the development seed sq_collect.py ran on")
    args = parser.parse_args()
    DATA = ROOT / f"valid-seed{args.seed}"
    meta, z, sources, attribution = load()
    v2, held, v1 = meta["v2000"], meta["held1000"], meta["v1000"]
    shares = meta["shares_valid"]
    base, knock, reg = z["base"], z["knockouts"], z["regime"]
    tok_v, tok_t = per_window_tokens(meta["ppl_valid"]), per_window_tokens(meta["ppl_held"])
    n_heads = int(np.prod(meta["shape"]))
    kinds = [sources[k] for k in reg["keys"]]
    res: dict = {"setup": {"model": "smollm2-135m", "axis": "gender_and_sex", "measure": "likelihood",
                           "seed": args.seed, "regime_masks": len(kinds), "kinds": {k: kinds.count(k) for k in set(kinds)},
                           "search_half_prompts": len(v2), "held_half_prompts": len(held),
                           "search_text": meta["ppl_valid"], "held_text": meta["ppl_held"],
                           "note": "validation only: the held half is the validation split's confirmation half"}}

    # ---- regime: masks whose held-half perplexity change is within the budget (where choices are made)
    base_tppl = base["ppl_held"][0].sum() / (base["ppl_held"].shape[1] * tok_t)
    reg_tppl = reg["ppl_held"].sum(1) / (reg["ppl_held"].shape[1] * tok_t)
    held_change = np.exp(reg_tppl - base_tppl) - 1
    inside = held_change <= TAU
    res["setup"]["inside_budget_on_held"] = int(inside.sum())
    d_held = design_for(held, meta["shares_held"])
    held_bias = d_held.bias(reg["held1000"])
    res["setup"]["held_bias_unrepaired"] = float(d_held.bias(base["held1000"][0]))

    # ---- 1. bias measurement: split-half reliability and search->held agreement per prompt count
    rows = []
    half_a, half_b = halves(v2)
    for adjust in ("template", "none"):
        bt = design_for(held, meta["shares_held"], adjust).bias(reg["held1000"])
        for n in COUNTS:
            ia, ib = take(v2, half_a, n), take(v2, half_b, n)
            da, db = design_for([v2[i] for i in ia], shares, adjust), design_for([v2[i] for i in ib], shares, adjust)
            ba, bb = da.bias(reg["v2000"][:, ia]), db.bias(reg["v2000"][:, ib])
            rows.append({"adjust": adjust, "prompts": int(len(ia)), "split_half_all": rho(ba, bb),
                         "split_half_regime": rho(ba[inside], bb[inside]), "search_held_all": rho(ba, bt),
                         "search_held_regime": rho(ba[inside], bt[inside])})
        full = design_for(v2, shares, adjust).bias(reg["v2000"])
        rows.append({"adjust": adjust, "prompts": len(v2), "split_half_all": None, "split_half_regime": None,
                     "search_held_all": rho(full, bt), "search_held_regime": rho(full[inside], bt[inside])})
    res["bias_measurement"] = rows
    for r in rows:
        print(f"bias ({r['adjust']:8s}) {r['prompts']:5d} prompts: split-half {r['split_half_regime'] or float('nan'):+.2f} "
              f"(all {r['split_half_all'] or float('nan'):+.2f}), search->held {r['search_held_regime']:+.2f} "
              f"(all {r['search_held_all']:+.2f})")

    # ---- 2. perplexity: change on the search half's text vs the held half's
    ppl_rows = []
    bv = base["ppl_valid"][0]
    total_windows = bv.shape[0]
    for windows in sorted({min(w, total_windows) for w in (4, 8, 16, total_windows)}):
        change = np.exp((reg["ppl_valid"][:, :windows].sum(1) - bv[:windows].sum()) / (windows * tok_v)) - 1
        diffs = (reg["ppl_valid"][:, :windows] - bv[:windows]) / tok_v  # per-window mean NLL change
        se = diffs.std(axis=1, ddof=1) / np.sqrt(windows)
        ucb = np.exp(diffs.mean(1) + 1.645 * se) - 1
        ppl_rows.append({
            "tokens": windows * tok_v, "spearman_with_held_all": rho(change, held_change),
            "spearman_with_held_near_budget": rho(change[held_change < 0.15], held_change[held_change < 0.15]),
            "mean_held_minus_search": float(np.mean(held_change - change)),
            "within_budget_on_valid_but_over_on_held": int(((change <= TAU) & (held_change > TAU)).sum()),
            "within_budget_on_valid": int((change <= TAU).sum()),
            "ucb90_within_budget_but_over_on_held": int(((ucb <= TAU) & (held_change > TAU)).sum()),
            "ucb90_within_budget": int((ucb <= TAU).sum()),
            "ucb90_covers_held": float(np.mean(held_change <= ucb)),
        })
    res["perplexity"] = ppl_rows
    for r in ppl_rows:
        print(f"ppl {r['tokens']:5.0f} search tokens: Spearman with held {r['spearman_with_held_all']:+.2f}, held - search "
              f"{100 * r['mean_held_minus_search']:+.2f} pts, in budget on search text but not held "
              f"{r['within_budget_on_valid_but_over_on_held']}/{r['within_budget_on_valid']}; UCB90 rule "
              f"{r['ucb90_within_budget_but_over_on_held']}/{r['ucb90_within_budget']}, covers {r['ucb90_covers_held']:.2f}")

    # ---- 0. single-head knockout effects: how reliable, and how well a first-order estimate finds them
    res["knockouts"] = knockout_reliability(meta, base, knock, attribution, shares, tok_v)

    # ---- 3. surrogates inside the regime
    fresh = index_of(v2, sorted({r[0] for r in v2} - {r[0] for r in v1}))
    d_fresh = design_for([v2[i] for i in fresh], shares)
    fresh_bias = d_fresh.bias(reg["v2000"][:, fresh])
    res["setup"]["fresh_prompts"] = int(len(fresh))
    k_scores, b_scores = knock["v1000"], base["v1000"][0]
    bits = np.array([[c == "1" for c in np.unpackbits(np.frombuffer(bytes.fromhex(k), dtype=np.uint8))[:n_heads].astype(str)]
                     for k in reg["keys"]], dtype=float)
    pruned = 1.0 - bits
    lp0_v = bv.sum() / (total_windows * tok_v)
    dlp_k = knock["ppl_valid"].sum(1) / (total_windows * tok_v) - lp0_v
    meas_lp_change = reg["ppl_valid"].sum(1) / (total_windows * tok_v) - lp0_v
    surr = []

    def score(name, pred_bias, pred_lp=None, extra=None):
        row = {"surrogate": name, "fresh_valid_regime": rho(pred_bias[inside], fresh_bias[inside]),
               "held_regime": rho(pred_bias[inside], held_bias[inside]), "fresh_valid_all": rho(pred_bias, fresh_bias),
               "held_all": rho(pred_bias, held_bias)}
        if pred_lp is not None:
            row["log_ppl_valid_all"] = rho(pred_lp, meas_lp_change)
            row["log_ppl_held_all"] = rho(pred_lp, np.log1p(held_change))
        row.update(extra or {})
        surr.append(row)
        print(f"{name:36s} bias: fresh search-half {row['fresh_valid_regime']:+.2f} held {row['held_regime']:+.2f} "
              f"(all masks {row['fresh_valid_all']:+.2f} / {row['held_all']:+.2f})"
              + (f"; log-ppl {row['log_ppl_valid_all']:+.2f} / held {row['log_ppl_held_all']:+.2f}" if pred_lp is not None else ""))

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
        E = -pg / (total_windows * tok_v)
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
          for w in np.array_split(np.arange(base["ppl_valid"].shape[1]), 2)]
    out["log_ppl_effect_split_half_spearman"] = rho(*lp)
    out["heads_lowering_bias_alone"] = int((change < 0).sum())
    out["knockout_bias_change_quantiles"] = np.percentile(change / bias0, [5, 25, 50, 75, 95]).tolist()
    windows = base["ppl_valid"].shape[1]
    dlp = knock["ppl_valid"].sum(1) / (windows * tok_v) - base["ppl_valid"][0].sum() / (windows * tok_v)
    out["knockout_ppl_change_quantiles"] = np.expm1(np.percentile(dlp, [5, 25, 50, 75, 95])).tolist()
    if attribution is not None:
        g = attribution["bias_grad"].reshape(len(v1), -1)
        D = -(d.projection @ g).T
        E = -attribution["ppl_grad"].reshape(attribution["ppl_grad"].shape[0], -1).sum(0) / (windows * tok_v)
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
