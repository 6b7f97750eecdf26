"""Head-to-head comparison of Attention Pruning with FASP and simpler pruning baselines.

All methods share one run store, one validation evaluator and one perplexity budget. Each
method proposes candidate masks; candidates are evaluated on the validation split and the
lowest-bias one within the budget (and below the unrepaired bias) is the method's choice.
The choices are then measured on the TEST split, paired with the unrepaired model on the
same prompts. Every LLM evaluation goes into the store, so single-head knockouts (270 on
the default model) are computed once and reused by FASP, ``bias_only`` and ``ppl_only``,
and by later runs with the same configuration.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from attnprune.config import RepairConfig
from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.repair import Run, pruned_bounds, transfer_axes
from attnprune.search import baselines as B
from attnprune.search.annealing import anneal

METHODS = ("ap", "random", "magnitude", "gradient", "fasp", "bias_only", "ppl_only", "direct_sa")
KNOCKOUT_METHODS = {"fasp", "bias_only", "ppl_only"}
DEFAULT_TRANSFER = "race_ethnicity,religion,sexual_orientation,nationality"


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names, validated."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    # cheap methods first: a long comparison writes its table after every method
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"Unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}.")
    if "direct_sa" in methods and "ap" not in methods:
        raise UserError("direct_sa gets the same LLM-evaluation budget as ap, so list ap too.")
    return list(dict.fromkeys(methods))


def compare(cfg: RepairConfig, methods: list[str], loaded=None, log=print) -> dict:
    """Run every method in ``methods`` on one store; write ``comparison.json/.md/.png`` to ``cfg.out_dir``."""
    t_all = time.perf_counter()
    run = Run.open(cfg, loaded, log)
    shape = run.shape
    if "ap" in methods:
        run.sample()
    base = run.base()
    budget = run.budget()
    log(f"unrepaired (valid): bias {base.bias:.3f}, perplexity {base.perplexity:.2f}; budget {budget:.2f}")
    results: dict[str, dict] = {}
    knock_info: dict = {}
    report = {
        "model": run.loaded.name, "config": cfg.to_dict(), "methods": methods,
        "validation": {"setup": run.valid.describe(), "unrepaired": {"bias": base.bias, "perplexity": base.perplexity},
                       "budget": budget},
        "knockouts": knock_info, "test_setup": None, "unrepaired_test": None, "results": results,
    }

    def knockouts() -> B.Knockouts:
        if "scores" not in knock_info:
            t = time.perf_counter()
            before = run.store.count()
            rows = run.evaluate_into_store(B.knockout_masks(shape), "knockout",
                                           "single-head knockouts (valid)")
            knock_info.update(evaluations=len(rows), new=run.store.count() - before, seconds=time.perf_counter() - t,
                              scores=B.Knockouts(np.array([r.bias for r in rows]).reshape(shape),
                                                 np.array([r.perplexity for r in rows]).reshape(shape)))
            report["knockouts"] = {k: v for k, v in knock_info.items() if k != "scores"}
        return knock_info["scores"]

    for method in methods:
        t = time.perf_counter()
        before = run.store.count()
        notes = ""
        if method == "ap":
            search = run.attention_pruning()
            rows = search["rows"]
            spent = len(rows)
            notes = f"{cfg.samples} samples + {cfg.rounds} rounds x {cfg.top_k} candidates"
        elif method == "direct_sa":
            rows = _direct_sa(run, results["ap"]["llm_evaluations"])
            spent = len(rows)
            notes = f"annealing on the real model, {spent} evaluations (ap's budget)"
        else:
            if method in KNOCKOUT_METHODS:
                cands = getattr(B, method)(knockouts())
            elif method == "random":
                cands = B.random_heads(shape, cfg.seed)
            elif method == "magnitude":
                cands, used = B.magnitude(run.loaded.layout)
                notes = f"weights counted: {used}"
            else:  # gradient
                cands = B.gradient(run.loaded.model, run.loaded.layout, run.valid.ppl_measure.windows_)
            rows = run.evaluate_into_store(cands, f"method:{method}",
                                           f"{method}: candidates (valid)")
            spent = len(rows) + (knock_info["evaluations"] if method in KNOCKOUT_METHODS else 0)
            if method in KNOCKOUT_METHODS:
                notes = "single-head knockouts shared with the other knockout methods (their time is in the first one's seconds)"
        chosen = run.best_within_budget(rows)
        results[method] = {
            "llm_evaluations": spent, "new_evaluations": run.store.count() - before, "seconds": time.perf_counter() - t,
            "candidates": len(rows), "notes": notes,
            "valid": None if chosen is None else {"bias": chosen.bias, "perplexity": chosen.perplexity,
                                                   "n_pruned": chosen.mask.n_pruned},
            "mask": None if chosen is None else chosen.mask.to_dict(run.loaded.name),
        }
        log(f"{method}: " + ("no candidate within the budget" if chosen is None else
                             f"{chosen.mask.n_pruned} heads, valid bias {chosen.bias:.3f}, perplexity {chosen.perplexity:.2f}")
            + f" ({spent} LLM evaluations, {results[method]['seconds']:.0f} s)")
        if chosen is not None:
            _test(run, cfg, method, chosen.mask, results[method], report)
        report["seconds"] = time.perf_counter() - t_all
        if "ap" in results and "fasp" in results:
            report["ap_vs_fasp_evaluations"] = results["fasp"]["llm_evaluations"] / max(1, results["ap"]["llm_evaluations"])
        write_comparison(report, cfg.out_dir)  # after every method: an interrupted comparison keeps its table
    run.close()
    return report


def _test(run: Run, cfg: RepairConfig, method: str, mask: HeadMask, result: dict, report: dict) -> None:
    """Measure one method's choice on the TEST split (and the transfer axes) into ``result``."""
    tr = run.test_measure(cfg.bias, cfg.bias, cfg.axis, cfg.test_prompts, {}, True, [mask])[0]
    report["test_setup"], report["unrepaired_test"] = tr["setup"], tr["unrepaired"]
    result["test"] = {
        "bias": tr["repaired"]["bias"], "ci": tr["repaired"]["ci"], "bias_change": tr["bias_change"],
        "perplexity": tr["repaired"]["perplexity"], "perplexity_change": tr["perplexity_change"],
        "meets_budget": tr["perplexity_change"] <= cfg.tau,
    }
    result["transfer"] = {}
    for axis in transfer_axes(cfg):
        x = run.test_measure(f"{cfg.bias}/{axis}", cfg.bias, axis, cfg.test_prompts, {}, False, [mask])[0]
        result["transfer"][axis] = {"bias": x["repaired"]["bias"], "unrepaired": x["unrepaired"]["bias"],
                                    "bias_change": x["bias_change"]}


def _direct_sa(run: Run, budget: int) -> list:
    """The repair's annealer on the real evaluator, ``budget`` LLM evaluations in all."""
    cfg = run.cfg
    shape = run.shape
    total = shape[0] * shape[1]
    k_min, k_max = pruned_bounds(cfg, total)
    base = run.base()
    samples = run.store.evaluations(run.valid_setting, ["sample"])
    scale = float(np.std([r.bias for r in samples])) if len(samples) > 1 else 1.0
    seen: dict[HeadMask, object] = {}  # distinct evaluated masks, in order

    def evaluate(mask: HeadMask):
        row = run.evaluate_into_store([mask], "method:direct_sa", "direct_sa")[0]
        seen.setdefault(row.mask, row)
        return row.bias, row.perplexity

    cost = B.direct_sa_cost(evaluate, shape, math.log(base.perplexity * (1 + cfg.tau)), cfg.penalty * scale,
                            math.log(1 + max(cfg.tau, 1e-3)))
    # T0 from the sampled masks' spread (estimating it would cost hundreds of evaluations)
    anneal(cost, total, k_min, k_max, chains=1, steps=max(1, budget - 1), seed=cfg.seed, t0=0.5 * scale,
           cooling=cfg.cooling, top=1)
    return list(seen.values())


def markdown(report: dict) -> str:
    """The comparison table."""
    ts = report["test_setup"] or {}
    bi, pi = ts.get("bias_inputs", {}), ts.get("perplexity_inputs", {})
    u = report["unrepaired_test"] or {}
    lines = [
        f"# Pruning methods compared on {report['model']}",
        "",
        f"Test split: {report['config']['bias']} bias on {bi.get('axis')}, {bi.get('prompts')} prompts (seed "
        f"{bi.get('prompt_seed')}); perplexity on {pi.get('corpus')} {pi.get('split')}, {pi.get('tokens_scored')} tokens. "
        f"Selection on validation only, budget: perplexity <= {1 + report['config']['tau']:.2f} x unrepaired.",
        "",
        f"Unrepaired (test): bias {u.get('bias', float('nan')):.3f} [{u.get('ci', [0, 0])[0]:.3f}, {u.get('ci', [0, 0])[1]:.3f}], "
        f"perplexity {u.get('perplexity', float('nan')):.2f}",
        "",
        "| method | heads | test bias | 95% CI | bias change | paired CI of change | test ppl | ppl change | in budget | LLM evals | new evals | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in report["results"].items():
        if "test" not in r:
            lines.append(f"| {method} | - | no candidate within the validation budget | | | | | | | {r['llm_evaluations']} | "
                         f"{r['new_evaluations']} | {r['seconds']:.0f} |")
            continue
        t = r["test"]
        lines.append(
            f"| {method} | {r['valid']['n_pruned']} | {t['bias']:.3f} | [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] | "
            f"{100 * t['bias_change']['relative']:+.1f}% | [{t['bias_change']['ci'][0]:+.3f}, {t['bias_change']['ci'][1]:+.3f}] | "
            f"{t['perplexity']:.2f} | {100 * t['perplexity_change']:+.1f}% | {'yes' if t['meets_budget'] else 'no'} | "
            f"{r['llm_evaluations']} | {r['new_evaluations']} | {r['seconds']:.0f} |")
    axes = sorted({a for r in report["results"].values() for a in r.get("transfer", {})})
    if axes:
        lines += ["", "Transfer (gender-repaired mask, test split, relative bias change):", "",
                  "| method | " + " | ".join(axes) + " |", "|---|" + "---|" * len(axes)]
        for method, r in report["results"].items():
            if r.get("transfer"):
                lines.append(f"| {method} | " + " | ".join(
                    f"{100 * r['transfer'][a]['bias_change']['relative']:+.1f}%" for a in axes) + " |")
    if "ap_vs_fasp_evaluations" in report:
        lines += ["", f"FASP spent {report['ap_vs_fasp_evaluations']:.2f}x the LLM evaluations of AP."]
    lines += ["", "Notes: " + "; ".join(f"{m}: {r['notes']}" for m, r in report["results"].items() if r["notes"]), ""]
    return "\n".join(lines)


def write_comparison(report: dict, out: Path) -> None:
    """comparison.json, comparison.md and comparison.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "comparison.md").write_text(markdown(report))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    u = report["unrepaired_test"]
    if u:
        ax.errorbar([u["perplexity"]], [u["bias"]], yerr=[[u["bias"] - u["ci"][0]], [u["ci"][1] - u["bias"]]],
                    fmt="*", ms=14, c="red", label="unrepaired")
    for method, r in report["results"].items():
        if "test" in r:
            t = r["test"]
            ax.errorbar([t["perplexity"]], [t["bias"]], yerr=[[t["bias"] - t["ci"][0]], [t["ci"][1] - t["bias"]]],
                        fmt="o", capsize=3, label=method)
    ax.set_xlabel("test perplexity")
    ax.set_ylabel(f"test bias ({report['config']['bias']}, 95% CI)")
    ax.set_title(f"Methods on {report['model']} (test split)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)
