"""Knockouts measured for the bias alone (``--knockout-ppl``): what they save and what they cost, on development seeds.

A knockout's perplexity is about two thirds of its seconds on the default model
(``benchmarks/statistics_share.py``), and the knockouts are AP's largest item. With
``--knockout-ppl SHARE`` only that share of the screened knockouts (spread over the heads'
first-order perplexity estimates) measures perplexity; the others measure the bias alone and
take their perplexity effect from the first-order prior, on the line the measured ones fit.

For each development seed, side by side on this machine:

1. **full**: AP at today's defaults (every knockout with perplexity) in a fresh store, and the
   shared policy's choice, confirmed on the confirmation half of validation.
2. **share**: AP with ``--knockout-ppl SHARE`` on a copy of that store holding only what both
   designs share: the unrepaired model, the knockouts and the first-order, anchor and prior
   caches (each charged at its stored seconds, as a fresh run would be). The heads the share
   measures keep their knockouts; the others are evaluated again for the bias alone; the
   samples, candidates and confirmations are the variant's own, evaluated afresh.

It prints and writes, per seed and arm: the chosen heads, the confirmed bias against the
unrepaired model on the same confirmation prompts (and the share minus the full arm's, a
paired bootstrap CI on those prompts), the confirmed perplexity change and its bound, the
calibrations, AP's charged LLM evaluations and seconds by stage, and the ratio of seconds.
Validation data only: nothing here reads a test split, and only development seeds are
accepted.

    .venv/bin/python benchmarks/knockout_ppl.py --seeds 0,1,2 --share 0.15 [--out runs/knockout-ppl]

Writes ``benchmarks/results/knockout_ppl.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sqlite3
import time
from pathlib import Path

from attnprune import labels, load_model
from attnprune.config import RepairConfig
from attnprune.heads import HeadMask
from attnprune.methods import MethodContext, get_method
from attnprune.run import Run
from attnprune.selection import SelectionPolicy
from attnprune.store import Store
from common import DEVELOPMENT_SEEDS, write


def arm(cfg: RepairConfig, lm) -> dict:
    """AP's proposal and the policy's confirmed choice under ``cfg`` (validation only), with its cost by stage."""
    policy = SelectionPolicy.of(cfg)
    with Run.open(cfg, loaded=lm, log=print) as run:
        base = run.base()
        t = time.perf_counter()
        proposal = get_method("ap").propose(MethodContext(run, policy, cfg.seed))
        selection = policy.select(proposal.selectable(), base, run.confirm, labels.confirm("ap"), guard=run.guard,
                                  keep=proposal.kept_rows())
        wall = time.perf_counter() - t
        confirmations, confirm_seconds = run.confirmation_cost(labels.confirm("ap"), selection)
        bias_measure = run.evaluator(run.confirm_spec)[0].bias_measure
        out = {"evaluations": proposal.evaluations + confirmations, "seconds": proposal.seconds + confirm_seconds,
               "stages": {**proposal.stages(), "confirmations": {"evaluations": confirmations,
                                                                  "seconds": confirm_seconds}},
               "wall_seconds": wall, "calibrations": len(proposal.details.calibration), "notes": proposal.notes,
               "surrogates": [{"round": s["round"], "log_perplexity_spearman": s.get("cv", {}).get(
                   "log_perplexity", {}).get("additive", {}).get("spearman")} for s in proposal.details.surrogates]}
        if selection.confirmed is None:
            return {**out, "chosen": None}
        k, b = selection.confirmed, selection.base_confirmed
        vs_base = bias_measure.paired_difference(k.prompt_scores, b.prompt_scores)
        bound = policy.change_bound(k, b)[1]
        return {**out, "chosen": {"heads": k.mask.n_pruned, "pruned": [list(p) for p in k.mask.pruned],
                                  "source": selection.chosen.source, "confirmed_bias": k.bias,
                                  "unrepaired_confirmed_bias": b.bias,
                                  "bias_change": vs_base["diff"], "bias_change_ci": vs_base["diff_ci"],
                                  "relative_bias_change": vs_base["diff"] / b.bias,
                                  "perplexity_change": k.perplexity / b.perplexity - 1,
                                  "perplexity_change_bound": bound},
                "_scores": k.prompt_scores, "_measure": bias_measure}


def shared_copy(src: Path, dst: Path, base_key: str) -> None:
    """Copy the store at ``src`` to ``dst`` keeping only the unrepaired model, the knockouts and the meta caches."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy(src / "store.sqlite", dst / "store.sqlite")
    db = sqlite3.connect(dst / "store.sqlite")
    with db:
        db.execute("DELETE FROM labels WHERE label != ? AND mask_key != ?", (labels.KNOCKOUT, base_key))
        db.execute("DELETE FROM evaluations WHERE NOT EXISTS (SELECT 1 FROM labels WHERE labels.mask_key = "
                   "evaluations.mask_key AND labels.setting = evaluations.setting)")
    db.close()


def describe(name: str, a: dict) -> str:
    c = a["chosen"]
    cost = f"{a['evaluations']} LLM evaluations, {a['seconds']:.0f} s, {a['calibrations']} calibration(s)"
    if c is None:
        return f"  {name}: no admissible choice ({cost})"
    lo, hi = c["bias_change_ci"]
    return (f"  {name}: {c['heads']} heads, confirmed bias {c['confirmed_bias']:.3f} vs {c['unrepaired_confirmed_bias']:.3f}"
            f" ({100 * c['relative_bias_change']:+.1f}%, change CI [{lo:+.3f}, {hi:+.3f}]), perplexity "
            f"{100 * c['perplexity_change']:+.1f}% (bound {100 * c['perplexity_change_bound']:+.1f}%); {cost}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated development seeds")
    ap.add_argument("--share", type=float, default=0.15, help="--knockout-ppl of the variant arm")
    ap.add_argument("--out", default="runs/knockout-ppl", help="where the arms' stores go (kept for reruns)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if any(s not in DEVELOPMENT_SEEDS for s in seeds):
        raise SystemExit(f"only development seeds {DEVELOPMENT_SEEDS} may be read here")
    lm = load_model("smollm2-135m")
    base_key = HeadMask.all_active(*lm.layout.shape).key
    results = []
    for seed in seeds:
        full_dir, share_dir = Path(args.out) / f"seed-{seed}-full", Path(args.out) / f"seed-{seed}-share"
        full_cfg = RepairConfig(seed=seed, out=str(full_dir), checks="none", export=False)
        full = arm(full_cfg, lm)
        shared_copy(full_dir, share_dir, base_key)
        share_cfg = dataclasses.replace(full_cfg, out=str(share_dir), knockout_ppl=args.share)
        store = Store(share_dir / "store.sqlite", None)
        store.update_config(knockout_ppl=args.share)
        store.close()
        share = arm(share_cfg, lm)
        row = {"seed": seed, "full": full, "share": share,
               "seconds_ratio": share["seconds"] / full["seconds"]}
        if full["chosen"] and share["chosen"]:
            d = full["_measure"].paired_difference(share["_scores"], full["_scores"])
            row["share_minus_full"] = {"bias": d["diff"], "ci": d["diff_ci"]}
        for a in (full, share):
            a.pop("_scores", None), a.pop("_measure", None)
        results.append(row)
        print(f"seed {seed} (validation only):")
        print(describe("every knockout with perplexity", full))
        print(describe(f"--knockout-ppl {args.share:g}", share))
        more = ""
        if "share_minus_full" in row:
            lo, hi = row["share_minus_full"]["ci"]
            more = f"; confirmed bias, share minus full: {row['share_minus_full']['bias']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(f"  seconds, share / full: {row['seconds_ratio']:.2f}{more}")
        write("knockout_ppl", {"setup": {"model": "smollm2-135m", "split": "valid (search and confirmation halves)",
                                         "share": args.share, "seeds": seeds, "defaults": "RepairConfig()"},
                               "seeds": results})
    print(json.dumps([{"seed": r["seed"], "seconds_ratio": round(r["seconds_ratio"], 3)} for r in results]))


if __name__ == "__main__":
    main()
