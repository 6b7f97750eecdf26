"""A change of AP's decision options against today's defaults, side by side on development seeds (validation only).

For each development seed, on this machine:

1. **today**: AP at today's defaults in a fresh store (read back when ``--out`` holds it from
   an earlier run), and the shared policy's choice, confirmed on the confirmation half of
   validation.
2. **variant**: AP with the ``--set`` options on a copy of that store holding only what both
   designs share: the single-head knockouts and the first-order, anchor and prior caches
   (each charged at its stored seconds, as a fresh run would be; a knockout the variant's
   design does not ask for is neither used nor charged). The unrepaired model, the
   samples, candidates and confirmations are the variant's own, evaluated afresh (the
   unrepaired model pays the evaluator's start-up, as in a fresh run).

``--base KEY=VALUE`` gives both arms an option (a study at another budget: ``--base tau=0.02``);
``--share all`` copies today's whole store to the variant (for a variant that changes only what
AP does after today's search has ended, such as ``--set trim=1``: it pays only for what it
adds); ``--design-from DIR`` starts a new today's store from the knockouts and first-order
caches of ``DIR/seed-N-today`` (charged at their stored seconds).

It prints and writes, per seed and arm: the chosen heads, the confirmed bias against the
unrepaired model on the same confirmation prompts (and the variant minus today's, a paired
bootstrap CI on those prompts), the confirmed perplexity change and its bound, the
calibrations, AP's charged LLM evaluations and seconds by stage, and the ratio of seconds.
Validation data only: nothing here reads a test split, and only development seeds are
accepted.

    .venv/bin/python benchmarks/ap_variant.py --seeds 0,1,2 --set knockout_ppl=0.15 --name knockout_ppl \
        [--out runs/ap-variant]

A variant may also set the choice's guards (``--set guard=religion --set guard_margin=0 --share all``): the
variant's choice is then today's search under the guarded rule, and its cost is the guards' evaluations.

Writes ``benchmarks/results/<name>.json``. ``knockout_ppl.json`` (the fifteenth session's
study of ``--knockout-ppl 0.15``) was written by this script's first form, whose arms were
named ``full`` and ``share`` (today's ``today`` and ``variant``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sqlite3
from pathlib import Path

import yaml

from attnprune import labels, load_model
from attnprune.compare import propose_and_select
from attnprune.config import RepairConfig, _typed
from attnprune.errors import UserError
from attnprune.methods import MethodContext
from attnprune.run import Run
from attnprune.selection import SelectionPolicy
from attnprune.store import Store
from common import development_seeds, write


def arm(cfg: RepairConfig, lm) -> dict:
    """AP's proposal and the policy's confirmed choice under ``cfg`` (validation only), with its cost by stage."""
    policy = SelectionPolicy.of(cfg)
    with Run.open(cfg, loaded=lm, log=print) as run:
        base = run.base()
        a = propose_and_select(run, MethodContext(run, policy, cfg.seed), policy, "ap", base)
        proposal, selection = a.proposal, a.selection
        bias_measure = run.evaluator(run.confirm_spec)[0].bias_measure
        out = {"evaluations": a.evaluations, "seconds": a.evaluation_seconds, "stages": a.stages(),
               "wall_seconds": a.seconds, "calibrations": len(proposal.details.calibration),
               "trims": [t.to_dict() for t in proposal.details.trim], "notes": proposal.notes,
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


def shared_copy(src: Path, dst: Path, cfg: RepairConfig, keys, everything: bool = False) -> None:
    """Copy the store at ``src`` to ``dst`` keeping only the single-head knockouts and the meta caches (``everything``:
    all of it), and record ``cfg``'s values of the decision options ``keys`` as the copy's.

    The unrepaired model is left out so that the variant evaluates it again and pays the
    evaluator's start-up there, once, as a fresh run does (kept, its stored seconds would
    carry one start-up and the variant's first new mask another). ``everything`` is for a
    variant that changes only what AP does after today's search has ended (``--trim``): it
    reads today's evaluations back and pays only for what it adds.
    """
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy(src / "store.sqlite", dst / "store.sqlite")
    if not everything:
        db = sqlite3.connect(dst / "store.sqlite")
        with db:
            db.execute("DELETE FROM labels WHERE label != ?", (labels.KNOCKOUT,))
            db.execute("DELETE FROM evaluations WHERE NOT EXISTS (SELECT 1 FROM labels WHERE labels.mask_key = "
                       "evaluations.mask_key AND labels.setting = evaluations.setting)")
        db.close()
    store = Store(dst / "store.sqlite", None)
    store.update_config(**{k: v for k, v in cfg.store_config().items() if k in keys})
    store.close()


def describe(name: str, a: dict) -> str:
    c = a["chosen"]
    cost = (f"{a['evaluations']} LLM evaluations, {a['seconds']:.0f} s, {a['calibrations']} calibration(s)"
            + "".join(f", a trim of {t['heads']} heads to {t['kept']} in {len(t['probes'])} probe(s)"
                      for t in a.get("trims", [])))
    if c is None:
        return f"  {name}: no admissible choice ({cost})"
    lo, hi = c["bias_change_ci"]
    return (f"  {name}: {c['heads']} heads, confirmed bias {c['confirmed_bias']:.3f} vs {c['unrepaired_confirmed_bias']:.3f}"
            f" ({100 * c['relative_bias_change']:+.1f}%, change CI [{lo:+.3f}, {hi:+.3f}]), perplexity "
            f"{100 * c['perplexity_change']:+.1f}% (bound {100 * c['perplexity_change_bound']:+.1f}%); {cost}")


# the options a variant may change: AP's decisions, and the choice's no-harm guards (which the store does not record:
# a guarded variant with --share all reads today's evaluations back and pays only for its guards)
VARIANT_KEYS = RepairConfig.DECISION_KEYS + ("guard", "guard_margin", "guard_test", "guard_prompts")


def overrides(pairs: list[str], base: dict | None = None) -> dict:
    """``KEY=VALUE`` pairs of decision options (:data:`VARIANT_KEYS`), each read as YAML and typed
    as its option, as a ``--config`` file's values are; checked together with ``base`` (both arms' options)."""
    fields = {f.name: f for f in dataclasses.fields(RepairConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key not in VARIANT_KEYS or not value:
            raise SystemExit(f"--set {pair}: name one of the decision options {', '.join(VARIANT_KEYS)} "
                             "as KEY=VALUE (the measurement options stay today's, so that both arms share the "
                             "store's evaluations)")
        try:
            out[key] = _typed(yaml.safe_load(value), fields[key], f"--set {pair}", fix="fix --set")
        except yaml.YAMLError:
            raise SystemExit(f"--set {pair}: {value!r} is not a value; fix --set.") from None
        except UserError as exc:
            raise SystemExit(str(exc)) from None
    try:
        dataclasses.replace(RepairConfig(), **{**(base or {}), **out}).validate()  # the arm's checks, before any evaluation
    except UserError as exc:
        raise SystemExit(str(exc)) from None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated development seeds")
    ap.add_argument("--set", action="append", required=True, metavar="KEY=VALUE",
                    help="a decision option of the variant arm (repeatable), e.g. knockout_ppl=0.15 or knockouts=0.25")
    ap.add_argument("--base", action="append", default=[], metavar="KEY=VALUE",
                    help="a decision option of both arms (repeatable), e.g. tau=0.02: today's arm is today's defaults "
                    "with these")
    ap.add_argument("--share", choices=["design", "all"], default="design",
                    help="what the variant's store copies from today's: the knockouts and first-order caches "
                    "(design), or every evaluation (all: for a variant that changes only what happens after today's "
                    "search ended, e.g. trim=1; it pays only for what it adds)")
    ap.add_argument("--design-from", default=None, metavar="DIR",
                    help="start each new today's store from DIR/seed-N-today's knockouts and first-order caches "
                    "(measured there, charged at their stored seconds) instead of measuring them again")
    ap.add_argument("--name", default=None, help="the results' name: benchmarks/results/<name>.json (default from --set)")
    ap.add_argument("--out", default="runs/ap-variant", help="where the arms' stores go: seed-N-today (read back when "
                    "it is there, so variants run one after another share it) and seed-N-<name>")
    args = ap.parse_args()
    seeds = development_seeds(args.seeds)
    base = overrides(args.base) if args.base else {}
    change = overrides(args.set, base)
    label = " ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                     for k, v in change.items())
    name = args.name or "ap_variant-" + "-".join(f"{k}{v}" for k, v in change.items())
    lm = load_model("smollm2-135m")
    results = []
    for seed in seeds:
        today_dir, variant_dir = Path(args.out) / f"seed-{seed}-today", Path(args.out) / f"seed-{seed}-{name}"
        today_cfg = RepairConfig(seed=seed, out=str(today_dir), checks="none", export=False, **base)
        if args.design_from and not (today_dir / "store.sqlite").exists():
            shared_copy(Path(args.design_from) / f"seed-{seed}-today", today_dir, today_cfg, RepairConfig.DECISION_KEYS)
        today = arm(today_cfg, lm)
        variant_cfg = dataclasses.replace(today_cfg, out=str(variant_dir), **change)
        shared_copy(today_dir, variant_dir, variant_cfg, change, everything=args.share == "all")
        variant = arm(variant_cfg, lm)
        row = {"seed": seed, "today": today, "variant": variant, "seconds_ratio": variant["seconds"] / today["seconds"]}
        if today["chosen"] and variant["chosen"]:
            d = today["_measure"].paired_difference(variant["_scores"], today["_scores"])
            row["variant_minus_today"] = {"bias": d["diff"], "ci": d["diff_ci"]}
        for a in (today, variant):
            a.pop("_scores", None), a.pop("_measure", None)
        results.append(row)
        print(f"seed {seed} (validation only):")
        print(describe("today's defaults", today))
        print(describe(label, variant))
        more = ""
        if "variant_minus_today" in row:
            lo, hi = row["variant_minus_today"]["ci"]
            more = (f"; confirmed bias, variant minus today: {row['variant_minus_today']['bias']:+.3f} "
                    f"[{lo:+.3f}, {hi:+.3f}]")
        print(f"  seconds, variant / today: {row['seconds_ratio']:.2f}{more}")
        write(name, {"setup": {"model": "smollm2-135m", "split": "valid (search and confirmation halves)",
                               "variant": change, "both_arms": base, "share": args.share,
                               "design_from": args.design_from, "seeds": seeds, "defaults": "RepairConfig()"},
                     "seeds": results})
    print(json.dumps([{"seed": r["seed"], "seconds_ratio": round(r["seconds_ratio"], 3)} for r in results]))


if __name__ == "__main__":
    main()
