"""Collect per-prompt and per-window data for the signal-quality analysis (slow, resumable).

VALIDATION ONLY. The study chooses defaults, so it never reads a test split: the role the
test split used to play (an independent measurement of the same masks) is taken by the
*confirmation half* of the validation split, the half a repair confirms on and never
searches on. Its prompts (``part="confirm"``) and its perplexity text (the odd windows of
the validation text) are disjoint from the search half (``part="search"``) that the
knockouts, the regime masks' "search" measurements and the additive model use. Only
development seeds (0-2) are accepted.

Writes runs/signal_quality/valid-seed<S>/<group>.npz: for every mask of a group, the
per-prompt likelihood scores on the prompt sets and the per-window NLL sums on the texts.

    .venv/bin/python benchmarks/sq_collect.py --seed 0     # many hours on 2 cores, resumable

Not timed in this form. For scale: on 2 idle cores (2026-12-02) one knockout on 353 prompts
and 2,805 tokens took 28-45 s; each knockout here is on 1,074 prompts and up to 16,384 tokens,
and there are 270 of them plus about 60 regime masks on both halves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from attnprune import HeadMask, load_model
from attnprune.backend import Backend
from attnprune.measures import get_measure
from attnprune.search.annealing import anneal
from common import DEVELOPMENT_SEEDS

ROOT = Path(__file__).resolve().parent.parent / "runs" / "signal_quality"


def save(path: Path, masks: list[HeadMask], data: dict[str, list]) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array([m.key for m in masks]), **{k: np.array(v) for k, v in data.items()})
    tmp.replace(path)


def load(path: Path):
    if not path.is_file():
        return [], {}
    z = np.load(path)
    return list(z["keys"]), {k: list(z[k]) for k in z.files if k != "keys"}


def run_group(path: Path, masks: list[HeadMask], measures: dict, every: int = 5) -> None:
    keys, data = load(path)
    done = set(keys)
    todo = [m for m in masks if m.key not in done]
    print(f"{path.name}: {len(done)} done, {len(todo)} to do", flush=True)
    stored = [HeadMask.from_key(k, *masks[0].shape) for k in keys]
    t0 = time.time()
    for i, m in enumerate(todo):
        for name, (kind, meas) in measures.items():
            if kind == "bias":
                row = meas.prompt_scores([m])[0]
            else:
                row = np.array(meas.score([m])[0]["per_window"])
            data.setdefault(name, []).append(row)
        stored.append(m)
        if (i + 1) % every == 0 or i + 1 == len(todo):
            save(path, stored, data)
            el = time.time() - t0
            print(f"  {i + 1}/{len(todo)}  {el / (i + 1):.1f} s/mask", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0, help="a development seed (0-2)")
    ap.add_argument("--regime", type=int, default=20, help="masks per regime group")
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="perplexity tokens of each validation half")
    args = ap.parse_args()
    if args.seed not in DEVELOPMENT_SEEDS:
        raise SystemExit(f"--seed {args.seed}: this study chooses defaults, so it runs on development seeds "
                         f"({', '.join(map(str, DEVELOPMENT_SEEDS))}) only.")
    out = ROOT / f"valid-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2-135m")
    L, H = lm.layout.shape
    backend = Backend(lm)
    s = args.seed
    # search half of the validation prompts (knockouts and the search's view) and the confirmation half (held out)
    v1 = get_measure("likelihood", prompts=1000, seed=s, bootstrap_reps=10, part="search").prepare(backend)
    v2 = get_measure("likelihood", prompts=2000, seed=s, bootstrap_reps=10, part="search").prepare(backend)
    held = get_measure("likelihood", prompts=1000, seed=s, bootstrap_reps=10, part="confirm").prepare(backend)
    text = dict(source="xsum", seed=s, max_tokens=args.ppl_tokens)
    pv = get_measure("perplexity", part="search", **text).prepare(backend)
    ph = get_measure("perplexity", part="confirm", **text).prepare(backend)
    assert not {p.text for p in held.prompts_} & {p.text for p in v2.prompts_}, "the two halves must be disjoint"
    meta = {
        "shape": [L, H], "seed": s,
        "v1000": [(p.text, p.bucket, p.template) for p in v1.prompts_],
        "v2000": [(p.text, p.bucket, p.template) for p in v2.prompts_],
        "held1000": [(p.text, p.bucket, p.template) for p in held.prompts_],
        "shares_valid": v1.shares_, "shares_held": held.shares_,
        "ppl_valid": pv.describe(), "ppl_held": ph.describe(),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    base = HeadMask.all_active(L, H)
    full = {"v2000": ("bias", v2), "ppl_valid": ("ppl", pv), "held1000": ("bias", held), "ppl_held": ("ppl", ph)}
    run_group(out / "base.npz", [base], {"v1000": ("bias", v1), **full})
    knock = [HeadMask.from_pruned(L, H, [(l, h)]) for l in range(L) for h in range(H)]
    run_group(out / "knockouts.npz", knock, {"v1000": ("bias", v1), "ppl_valid": ("ppl", pv)})

    # regime masks
    rng = np.random.default_rng(100 + s)
    _, kd = load(out / "knockouts.npz")
    _, bd = load(out / "base.npz")
    lp_k = np.array(kd["ppl_valid"]).sum(1) / pv.describe()["tokens_scored"]
    lp_0 = np.array(bd["ppl_valid"]).sum(1)[0] / pv.describe()["tokens_scored"]
    dlp = lp_k - lp_0
    low = np.nonzero(dlp <= np.median(dlp))[0]
    uni = []
    while len(uni) < args.regime:
        k = int(rng.integers(2, 13))
        uni.append(HeadMask.from_pruned(L, H, [divmod(int(i), H) for i in rng.choice(L * H, k, replace=False)]))
    lowm = []
    while len(lowm) < args.regime:
        k = int(rng.integers(4, 17))
        lowm.append(HeadMask.from_pruned(L, H, [divmod(int(i), H) for i in rng.choice(low, k, replace=False)]))
    # search candidates: anneal on the additive bucket-mean model of the v1000 knockouts
    d = v1.design_
    mu0 = d.means(np.array(bd["v1000"])[0])
    D = torch.tensor(d.means(np.array(kd["v1000"])) - mu0, dtype=torch.float32)  # [N, B]
    w = torch.tensor(d.weights, dtype=torch.float32)
    mu0t = torch.tensor(mu0, dtype=torch.float32)
    dlpt = torch.tensor(dlp, dtype=torch.float32)
    search = []
    for j, tau in enumerate((0.02, 0.035, 0.05, 0.07)):
        def cost(states, tau=tau):
            pr = 1 - states
            mu = mu0t + pr @ D
            b = (mu @ w).unsqueeze(-1) - mu
            lp = pr @ dlpt
            return b.abs().sum(-1) + 5.0 * torch.clamp(lp - np.log(1 + tau), min=0) / 0.05
        res = anneal(cost, L * H, 2, 20, chains=256, steps=2000, seed=j, top=200)
        n = 0
        for st in res.states:
            m = HeadMask(st.reshape(L, H))
            if m not in search:
                search.append(m)
                n += 1
            if n == args.regime // 4:
                break
    sources = {}
    for name, group in (("uniform", uni), ("low_ppl", lowm), ("search", search)):
        for m in group:
            sources.setdefault(m.key, name)
    regime = list(dict.fromkeys(uni + lowm + search))
    (out / "regime_sources.json").write_text(json.dumps(sources))
    run_group(out / "regime.npz", regime, full)


if __name__ == "__main__":
    main()
