"""Methods x seeds on one budget, through the public interfaces of runs, methods and the policy.

For every seed (its own validation/test split of the prompts, sampling and search) one run
store holds every evaluation of every method, so single-head knockouts (270 on the
default model) are computed once per seed and shared by the knockout methods. Each method
proposes candidates; the shared :class:`~attnprune.selection.SelectionPolicy` chooses on
validation; the choice is measured on the TEST split, paired with the unrepaired model on
the same prompts, and on the transfer axes. ``comparison.json/.md/.png`` are rewritten
after every method, so an interrupted comparison keeps what it measured (and a rerun
continues from the stores).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from attnprune import labels
from attnprune.config import CompareConfig
from attnprune.errors import UserError
from attnprune.machine import code_line, code_version, describe_machine, machine_line
from attnprune.methods import MethodContext, Proposal, get_method
from attnprune.results import Comparison, MethodOutcome, SeedComparison, SeedValidation, measured, read_result
from attnprune.run import Log, Run
from attnprune.selection import Selection, SelectionPolicy

logger = logging.getLogger("attnprune")


def compare(cfg: CompareConfig, loaded=None, log: Log = logger.info) -> Comparison:
    """Run every method of ``cfg.methods`` for every seed; write ``comparison.json/.md/.png`` to ``cfg.out_dir``."""
    t_all = time.perf_counter()
    code = code_version()  # at the start: the modules this process runs were read then, whatever is committed later
    policy = SelectionPolicy.of(cfg)
    methods = cfg.method_list
    result = Comparison(model=cfg.model, config=cfg.to_dict(), methods=methods, seeds=cfg.seed_list,
                        rule=policy.rule())
    for seed in cfg.seed_list:
        seed_cfg = dataclasses.replace(cfg, seed=seed, out=str(cfg.out_dir / f"seed-{seed}"))
        with Run.open(seed_cfg, loaded, log) as run:
            loaded = run.loaded
            result.model = run.model_name
            base = run.base()
            log(f"seed {seed}: unrepaired (valid) bias {base.bias:.3f}, perplexity {base.perplexity:.2f}; "
                f"budget {policy.budget(base).limit:.2f}")
            entry = SeedComparison(seed=seed, validation=SeedValidation(
                setup=run.valid.setup(), unrepaired=measured(base), budget=policy.budget(base).limit),
                machine=describe_machine(cfg.device), code=code)
            result.per_seed.append(entry)
            ctx = MethodContext(run, policy, seed)
            for name in methods:
                entry.outcomes[name] = _run_method(run, ctx, policy, name, base, log)
                if get_method(name).sets_budget:  # random_search, ap_paper and direct_sa get AP's evaluations
                    ctx.evaluation_budget = entry.outcomes[name].validation_evaluations
                paired_with_ap(run, entry)
                if ctx.knockouts_done:
                    k = ctx.knockouts()
                    entry.knockouts = {"evaluations": k.evaluations, "evaluation_seconds": k.seconds}
                result.summary = summarize(result, cfg.tau)
                result.seconds = time.perf_counter() - t_all
                write_comparison(result, cfg.out_dir)  # after every method: an interrupted comparison keeps its table
    return result


@dataclasses.dataclass
class Attempt:
    """A method's proposal, the policy's choice among it on validation, and the confirmations that choice cost."""

    proposal: Proposal
    selection: Selection
    confirmations: int  # every confirmation the method caused, those of AP's calibration included
    confirm_seconds: float
    seconds: float  # wall-clock of proposing and choosing
    guards: int = 0  # the guard evaluations of its candidates (``--guard``; the unrepaired model's are shared)
    guard_seconds: float = 0.0

    @property
    def evaluations(self) -> int:
        """LLM evaluations charged to the method: its proposal's, its confirmations and its candidates' guards."""
        return self.proposal.evaluations + self.confirmations + self.guards

    @property
    def evaluation_seconds(self) -> float:
        """Seconds of real-model evaluation charged to the method (as stored)."""
        return self.proposal.seconds + self.confirm_seconds + self.guard_seconds

    def stages(self) -> dict[str, dict]:
        """Where the charged evaluations went: the proposal's stages, then the confirmations and the guards."""
        extra = {"confirmations": (self.confirmations, self.confirm_seconds), "guards": (self.guards, self.guard_seconds)}
        return {**self.proposal.stages(),
                **{k: {"evaluations": n, "seconds": s} for k, (n, s) in extra.items() if n}}


def propose_and_select(run: Run, ctx: MethodContext, policy: SelectionPolicy, name: str, base,
                       require: bool = False) -> Attempt:
    """Method ``name`` proposes through ``ctx``; the shared policy chooses on validation (nothing on test).

    ``require``: a selection with no choice raises one sentence saying what to change
    (:meth:`~attnprune.selection.SelectionPolicy.choose`) instead of returning ``chosen=None``.
    """
    t = time.perf_counter()
    proposal = get_method(name).propose(ctx)
    select = policy.choose if require else policy.select
    free = run.heads  # a stored mask that prunes a --protect head (a copied store's) is never chosen
    selection = select([r for r in proposal.selectable() if all(free[c] for c in r.mask.pruned)], base, run.confirm,
                       labels.confirm(name), guard=run.guard, keep=proposal.kept_rows())
    confirmations, confirm_seconds = run.confirmation_cost(labels.confirm(name), selection)
    guards, guard_seconds = run.guard_cost(selection)
    return Attempt(proposal, selection, confirmations, confirm_seconds, time.perf_counter() - t, guards, guard_seconds)


def _run_method(run: Run, ctx: MethodContext, policy: SelectionPolicy, name: str, base, log: Log) -> MethodOutcome:
    cfg = run.cfg
    before = run.store.count()
    a = propose_and_select(run, ctx, policy, name, base)
    proposal, selection = a.proposal, a.selection
    chosen = selection.chosen
    outcome = MethodOutcome(
        method=name, seed=cfg.seed, llm_evaluations=a.evaluations, validation_evaluations=proposal.evaluations,
        evaluation_seconds=a.evaluation_seconds, new_evaluations=run.store.count() - before, seconds=a.seconds,
        candidates=len(proposal.rows),
        notes="; ".join(x for x in (proposal.notes, f"{a.confirmations} confirmed" if a.confirmations else "",
                                    f"{a.guards} guard evaluations" if a.guards else "") if x),
        valid=selection.summary(policy), mask=None if chosen is None else chosen.mask.to_dict(run.model_name),
        confirmation=selection.candidates, stages=a.stages())
    log(f"{name}: " + (no_choice(selection.candidates, cfg.tau) if chosen is None else
                       f"{chosen.mask.n_pruned} heads, valid bias {chosen.bias:.3f}, perplexity {chosen.perplexity:.2f}")
        + f" ({proposal.evaluations} LLM evaluations, {outcome.seconds:.0f} s)")
    if chosen is not None:
        outcome.test = run.bench.compare(cfg.bias, [chosen.mask])[0]
        outcome.meets_budget = outcome.test.perplexity_change <= cfg.tau
        for axis in cfg.measured_axes:
            outcome.transfer[axis] = run.bench.compare(f"{cfg.bias}/{axis}", [chosen.mask], axis=axis,
                                                       with_perplexity=False)[0]
        outcome.checks = run.bench.checks(name, chosen.mask)
    return outcome


def paired_with_ap(run: Run, entry: SeedComparison) -> None:
    """AP minus every other method of ``entry`` on the same test prompts (a method without a choice: unrepaired)."""
    from attnprune.heads import HeadMask

    if "ap" not in entry.outcomes:
        return
    base = HeadMask.all_active(*run.shape)

    def mask_of(o) -> HeadMask:
        return base if o.mask is None else HeadMask.from_dict(o.mask)

    ap = mask_of(entry.outcomes["ap"])
    for name, o in entry.outcomes.items():
        if name != "ap" and name not in entry.ap_minus:
            entry.ap_minus[name] = run.bench.paired_relative_difference(labels.paired("ap", name), ap, mask_of(o))


def pooled_difference(per_seed: list[dict], level: float = 0.95) -> dict:
    """AP minus a method pooled over seeds: the equal-weight mean of the per-seed paired differences.

    Two intervals, because two kinds of noise matter: ``ci_prompts`` averages the seeds'
    bootstrap replicates resample by resample (prompt sampling only, the search's choices
    held fixed); ``ci_seeds`` is Student's t over the per-seed differences at two-sided
    ``level`` (the spread of the whole pipeline from seed to seed; it needs 2 or more seeds
    and is wide with few). Beside it the exact sign test: ``below_zero`` of the ``seeds``
    differences are negative (a zero counts against AP) and ``sign_p`` is the two-sided
    binomial p, which a skewed spread (one method's failure on one seed) cannot fool.
    """
    from scipy.stats import binomtest
    from scipy.stats import t as student_t

    from attnprune.stats import percentile_ci

    diffs = np.array([d["difference"] for d in per_seed], dtype=float)
    below = int((diffs < 0).sum())
    out = {"mean": float(diffs.mean()), "seeds": len(diffs), "ci_prompts": None, "ci_seeds": None, "level": level,
           "below_zero": below, "sign_p": float(binomtest(below, len(diffs), 0.5).pvalue)}
    reps = [np.asarray(d["replicates"], dtype=float) for d in per_seed if d.get("replicates")]
    if len(reps) == len(per_seed) and reps:
        n = min(len(r) for r in reps)
        out["ci_prompts"] = percentile_ci(np.mean([r[:n] for r in reps], axis=0))
    if len(diffs) > 1:
        quantile = student_t.ppf(1 - (1 - level) / 2, len(diffs) - 1)
        half = float(quantile * diffs.std(ddof=1) / math.sqrt(len(diffs)))
        out["ci_seeds"] = [float(diffs.mean() - half), float(diffs.mean() + half)]
    return out


def _spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"values": a.tolist(), "mean": float(a.mean()) if len(a) else float("nan"),
            "sd": float(a.std(ddof=1)) if len(a) > 1 else float("nan"),
            "min": float(a.min()) if len(a) else float("nan"), "max": float(a.max()) if len(a) else float("nan")}


def summarize(result: Comparison, tau: float, level: float = 0.95) -> dict:
    """Per method over seeds: test bias and perplexity changes (mean, spread), budget kept, cost; AP vs the rest.

    ``level``: the two-sided confidence of the pooled seeds' CI (:func:`pooled_difference`).
    """
    out: dict = {"methods": {}, "ap_minus": {}}
    for name in result.methods:
        outcomes = [s.outcomes[name] for s in result.per_seed if name in s.outcomes]
        tested = [o for o in outcomes if o.test is not None]
        out["methods"][name] = {
            "seeds": [o.seed for o in outcomes],
            "found": [o.test is not None for o in outcomes],
            "bias_change": _spread([o.test.bias_change.relative for o in tested]),
            "perplexity_change": _spread([o.test.perplexity_change for o in tested]),
            "budget_kept_on_test": all(o.meets_budget for o in tested),  # by every chosen mask ("found": which seeds chose)
            # ... and at one-sided 95% confidence (the window bootstrap's upper bound within tau)
            "budget_kept_95_on_test": all(o.test.perplexity_change_upper is not None
                                          and o.test.perplexity_change_upper <= tau for o in tested),
            "bound_over_on_test": [o.seed for o in tested if o.test.perplexity_change_upper is not None
                                   and o.test.perplexity_change_upper > tau],  # the seeds where it was not
            "llm_evaluations": _spread([o.llm_evaluations for o in outcomes]),
            "evaluation_seconds": _spread([o.evaluation_seconds for o in outcomes]),
        }
    if "ap" in result.methods:
        for name in result.methods:
            if name == "ap":
                continue
            diffs = []
            for s in result.per_seed:
                a, b = s.outcomes.get("ap"), s.outcomes.get(name)
                if a is None or b is None:
                    continue
                # a method without a choice keeps the unrepaired model: change 0
                ra = a.test.bias_change.relative if a.test else 0.0
                rb = b.test.bias_change.relative if b.test else 0.0
                diffs.append(ra - rb)
            cost = [s.outcomes["ap"].evaluation_seconds / s.outcomes[name].evaluation_seconds
                    for s in result.per_seed if "ap" in s.outcomes and name in s.outcomes
                    and s.outcomes[name].evaluation_seconds > 0]
            paired = [{"seed": s.seed, **{k: v for k, v in s.ap_minus[name].items() if k != "replicates"}}
                      for s in result.per_seed if name in s.ap_minus]
            out["ap_minus"][name] = {
                "relative_bias_change": _spread(diffs), "evaluation_seconds_ratio": _spread(cost),
                "paired": paired,
                "pooled": pooled_difference([s.ap_minus[name] for s in result.per_seed if name in s.ap_minus], level)
                if paired else None}
    return out


def no_choice(confirmed, tau: float) -> str:
    """Why a method chose nothing: nothing reached confirmation, or what its confirmed candidates missed."""
    if not confirmed:
        return "no candidate within the validation budget (keeps the unrepaired model)"
    over = [c.confirmed_perplexity_change_bound for c in confirmed if c.confirmed_perplexity_change_bound > tau]
    why = []
    if over:
        why.append(f"{len(over)} over the perplexity budget at the rule's confidence (lowest bound {_pct(min(over))})")
    within = [c for c in confirmed if c.confirmed_perplexity_change_bound <= tau]
    guarded = sum(1 for c in within if c.guards and not all(g.ok for g in c.guards.values()))
    if guarded:
        why.append(f"{guarded} within it but over a guard")
    if len(within) > guarded:
        why.append(f"{len(within) - guarded} within it but not below the unrepaired bias on confirmation")
    return (f"no admissible candidate (keeps the unrepaired model): {len(confirmed)} confirmed, "
            + "; ".join(why))


def _relative_ci(ch, unrepaired: float) -> str:
    """The paired CI of the absolute change over the unrepaired bias (the relative change's unit) and, as measured, absolute."""
    rel = ", ".join(_pct(v / unrepaired) for v in ch.ci) if unrepaired > 0 else "-"
    return f"[{rel}] (abs [{ch.ci[0]:+.3f}, {ch.ci[1]:+.3f}])"


def _bound_kept(t, tau: float) -> str:
    return "" if t.perplexity_change_upper is None else ("; yes" if t.perplexity_change_upper <= tau else "; no")


def _ppl_ci(t) -> str:
    return "" if t.perplexity_change_ci is None else (
        f" [{_pct(t.perplexity_change_ci[0])}, {_pct(t.perplexity_change_ci[1])}]")


def _pct(x: float | None, sign: str = "+") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:{sign}.1f}%"


def markdown(result: Comparison) -> str:
    """The comparison tables (per seed, then over seeds)."""
    cfg = result.config
    lines = [f"# Pruning methods compared on {result.model}", "",
             f"Selection on validation only ({result.rule}); claims on the test split. Seeds: "
             f"{', '.join(map(str, result.seeds))} (each seed: its own prompt split, sampling and search).", ""]
    if result.sources:
        lines += [f"Pooled by `attnprune pool` from {', '.join(f'`{p}`' for p in result.sources)}.", ""]
        mixed = code_mix(result)
        if mixed:
            lines += [mixed, ""]
    for s in result.per_seed:
        tested = [o.test for o in s.outcomes.values() if o.test is not None]
        lines.append(f"## Seed {s.seed}")
        lines.append("")
        if tested:
            t = tested[0]
            bi, pi, u = t.setup.bias_inputs, t.setup.perplexity_inputs, t.unrepaired
            lines += [f"Test split: {cfg['bias']} bias on {bi['axis']}, {bi['prompts']} prompts (seed "
                      f"{bi['prompt_seed']}); perplexity on {pi['corpus']} {pi['split']}, {pi['tokens_scored']} tokens. "
                      f"Unrepaired: bias {u.bias:.3f} [{u.ci[0]:.3f}, {u.ci[1]:.3f}], perplexity {u.perplexity:.2f}.", ""]
        lines += [f"Seconds measured on: {machine_line(s.machine)}. Code: {code_line(s.code)}.", ""]
        lines += ["| method | heads | test bias | 95% CI | bias change | paired 95% CI of change | test ppl | ppl change "
                  "[95% CI] | in budget (point; one-sided 95% bound) | LLM evals | eval s | new evals | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, o in s.outcomes.items():
            tail = f"{o.llm_evaluations} | {o.evaluation_seconds:.0f} | {o.new_evaluations} | {o.seconds:.0f} |"
            if o.test is None:
                lines.append(f"| {name} | - | {no_choice(o.confirmation, cfg['tau'])} | | | | | | | {tail}")
                continue
            t, ch = o.test, o.test.bias_change
            lines.append(
                f"| {name} | {o.valid.n_pruned} | {t.repaired.bias:.3f} | [{t.repaired.ci[0]:.3f}, "
                f"{t.repaired.ci[1]:.3f}] | {_pct(ch.relative)} | {_relative_ci(ch, t.unrepaired.bias)} | "
                f"{t.repaired.perplexity:.2f} | {_pct(t.perplexity_change)}{_ppl_ci(t)} | {'yes' if o.meets_budget else '**no**'}{_bound_kept(t, cfg['tau'])} | "
                f"{tail}")
        axes = sorted({a for o in s.outcomes.values() for a in o.transfer})
        if axes:
            lines += ["", "Transfer (the repaired mask on other axes, test split, relative bias change):", "",
                      "| method | " + " | ".join(axes) + " |", "|---|" + "---|" * len(axes)]
            for name, o in s.outcomes.items():
                if o.transfer:
                    lines.append(f"| {name} | " + " | ".join(_pct(o.transfer[a].bias_change.relative) for a in axes)
                                 + " |")
        lines += cost_table(s.outcomes)
        lines += check_table(s.outcomes)
        notes = "; ".join(f"{n}: {o.notes}" for n, o in s.outcomes.items() if o.notes)
        lines += ["", f"Notes: {notes}" if notes else "", ""]
    lines += over_seeds(result.summary)
    return "\n".join(lines)


def over_seeds(summary: dict) -> list[str]:
    """The over-seeds tables: each method's test changes ("none" where it chose nothing), then AP minus each."""
    summ = summary.get("methods", {})
    if not summ:
        return []
    lines = ["## Over seeds", "",
             "| method | test bias change per seed | mean | sd | test ppl change per seed | budget kept on test | "
             "LLM evals (mean) | eval s (mean) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in summ.items():
        change, ppl = iter(m["bias_change"]["values"]), iter(m["perplexity_change"]["values"])
        per_seed = ", ".join(_pct(next(change)) if f else "none" for f in m["found"])
        ppls = ", ".join(_pct(next(ppl)) if f else "none" for f in m["found"])
        missing = [str(seed) for seed, f in zip(m["seeds"], m["found"]) if not f]
        mean = _pct(m["bias_change"]["mean"]) + (f" ({sum(m['found'])} of {len(m['found'])} seeds)" if missing else "")
        kept = ("yes" if m["budget_kept_on_test"] else "no") if any(m["found"]) else "-"
        over = m.get("bound_over_on_test", [])
        if over:  # the point held but not the one-sided bound: the per-seed tables say "yes; no"
            kept += f" (one-sided 95% bound over on seed{'s' if len(over) > 1 else ''} {', '.join(map(str, over))})"
        if missing:
            kept += f"; no choice on seed{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        lines.append(f"| {name} | {per_seed} | {mean} | {_pct(m['bias_change']['sd'], sign='')} | {ppls} | "
                     f"{kept} | {m['llm_evaluations']['mean']:.0f} | {m['evaluation_seconds']['mean']:.0f} |")
    diffs = summary.get("ap_minus", {})
    if diffs:
        level = next((d["pooled"].get("level", 0.95) for d in diffs.values() if d.get("pooled")), 0.95)
        lines += ["", "AP minus each method, on the same test prompts (difference of relative test bias changes, "
                  "in points; negative = AP lower; a method without a choice keeps the unrepaired model). Per seed: "
                  "the paired bootstrap 95% CI. Pooled: the mean over seeds, with a 95% CI from the prompts alone "
                  f"(seeds' replicates averaged), a {100 * level:g}% CI from the spread over seeds (Student's t), and "
                  "the sign test (seeds where AP is lower, two-sided exact binomial p; a tie counts against AP):", "",
                  f"| vs | per seed [paired 95% CI] | pooled mean | CI (prompts) | {100 * level:g}% CI (seeds) | "
                  "sign test | AP eval seconds / method's |", "|---|---|---|---|---|---|---|"]
        for name, d in diffs.items():
            pooled = d.get("pooled")
            if not pooled:
                continue
            per_seed = ", ".join(f"{_pct(x['difference'])} [{_pct(x['ci'][0])}, {_pct(x['ci'][1])}]"
                                 for x in d["paired"])
            ci = [("[" + ", ".join(_pct(v) for v in pooled[k]) + "]") if pooled[k] else "-"
                  for k in ("ci_prompts", "ci_seeds")]
            sign = (f"{pooled['below_zero']} of {pooled['seeds']}, p = {pooled['sign_p']:.3g}"
                    if "sign_p" in pooled else "-")
            lines.append(f"| {name} | {per_seed} | {_pct(pooled['mean'])} | {ci[0]} | {ci[1]} | {sign} | "
                         f"{d['evaluation_seconds_ratio']['mean']:.2f} |")
    lines.append("")
    return lines


def cost_table(outcomes: dict[str, MethodOutcome]) -> list[str]:
    """Where each method's LLM evaluations and their seconds went (empty for comparisons that did not keep it)."""
    kept = {n: o for n, o in outcomes.items() if o.stages}
    stages = list(dict.fromkeys(st for o in kept.values() for st in o.stages))
    if not stages:
        return []
    lines = ["", "Where the evaluation seconds went (LLM evaluations, seconds; validation and confirmation data):", "",
             "| method | " + " | ".join(stages) + " | total |", "|---|" + "---|" * (len(stages) + 1)]
    for name, o in kept.items():
        cells = [f"{o.stages[st]['evaluations']}, {o.stages[st]['seconds']:.0f} s" if st in o.stages else "-"
                 for st in stages]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {o.llm_evaluations}, {o.evaluation_seconds:.0f} s |")
    return lines


def check_table(outcomes: dict[str, MethodOutcome]) -> list[str]:
    """Held-out benchmarks of each method's choice: statistic before -> after (paired 95% CI of the change)."""
    from attnprune.report import statistic_cells

    rows = [(n, o.checks) for n, o in outcomes.items() if o.checks]
    if not rows:
        return []
    columns = [(m, k) for m, t in rows[0][1].items() for k in t.statistics if k != "bias"]
    lines = ["", "Held-out benchmarks of each choice (test split; before -> after, paired 95% CI of the change):", "",
             "| method | " + " | ".join(f"{m} {k}" for m, k in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, checks in rows:
        lines.append(f"| {name} | " + " | ".join(statistic_cells(checks[m].statistics[k]) for m, k in columns) + " |")
    return lines


def write_comparison(result: Comparison, out: Path) -> None:
    """comparison.json, comparison.md and comparison.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result.to_dict(), indent=1, default=float) + "\n")
    (out / "comparison.md").write_text(markdown(result))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = {}
    for s in result.per_seed:
        for name, o in s.outcomes.items():
            if o.test is None:
                continue
            color = colors.setdefault(name, f"C{len(colors)}")
            ax.scatter([100 * o.test.perplexity_change], [100 * o.test.bias_change.relative], c=color,
                       label=name if s is result.per_seed[0] or name not in ax.get_legend_handles_labels()[1] else None)
    ax.axvline(100 * result.config["tau"], color="gray", lw=0.8, ls=":", label="perplexity budget")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("test perplexity change (%)")
    ax.set_ylabel(f"test bias change (%), {result.config['bias']}")
    ax.set_title(f"Methods on {result.model}, seeds {', '.join(map(str, result.seeds))} (test split)")
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)


# Options that change how a comparison ran or what else it measured, never a method's choice
# or its test numbers: runs that differ only in these may be pooled.
POOL_FREE = frozenset({
    "device", "dtype", "device_map", "cache_dir", "mask_batch", "reuse_layers", "layer_cache_mb", "out", "seed",
    "seeds", "methods", "executor", "address", "workers", "worker_cpus", "worker_gpus", "export", "transfer_axes",
    "checks", "second_opinion", "toxicity_prompts"})


def read_comparison(path: Path) -> Comparison:
    """``comparison.json`` of a comparison directory (or the file itself), or one sentence saying what is wrong."""
    file = path / "comparison.json" if path.is_dir() else path
    return read_result(Comparison, file,
                       f"{path} holds no comparison.json; give the --out directory of an `attnprune compare` run.",
                       f"{file} is not a comparison of this attnprune version ({{error}}); rerun that comparison "
                       "(it reuses its stores) or leave it out.")


def _merged(kept: dict, other: dict, note: str) -> dict:
    """One seed's record (machine or code) from two runs of it: the one there is, or ``note`` when they differ."""
    if kept and other and kept != other:
        return {"note": note}
    return kept or other


def code_mix(result: Comparison) -> str | None:
    """One sentence when a pooled comparison's seeds ran different or unrecorded code (None when one commit ran all).

    ``pool`` compares options, not code: a method changed between two commits pools silently,
    so the table says which commit ran which seed and leaves the judgement to its reader.
    """
    by_code: dict[str, list[int]] = {}
    for s in result.per_seed:
        by_code.setdefault(code_line(s.code), []).append(s.seed)
    if len(by_code) < 2:
        return None
    parts = "; ".join(f"{code} ({', '.join(map(str, seeds))})" for code, seeds in by_code.items())
    return (f"Code differs between the pooled seeds: {parts}. `attnprune pool` checks that the options agree, not "
            "the code; pool these seeds only if no commit between them changed how a method chooses.")


def pool(paths: list[Path], log: Log = logger.info, level: float = 0.95) -> Comparison:
    """One comparison from several (seeds run on other machines or at other times), re-summarised over all seeds.

    ``level``: the two-sided confidence of the seeds' CI (a pre-registered look can set its own).

    The runs must agree on the model and on every option that shapes a choice or a test
    number (everything but :data:`POOL_FREE`); options only one run records are not
    compared. A seed found in two runs is merged method by method: the same method must
    have chosen the same mask in both, and its first row is kept; AP-minus rows are kept
    from whichever run measured them. AP is deterministic given the seed on one machine,
    but not across machines: float rounding in the evaluations (about 1e-6 relative) can
    send the search to other candidates, so two machines' runs of one seed may refuse to pool.
    """
    if len(paths) < 2:
        raise UserError("--runs needs at least two comparison directories, comma-separated.")
    runs = [read_comparison(p) for p in paths]
    first = runs[0]
    for path, r in zip(paths[1:], runs[1:]):
        if r.model != first.model:
            raise UserError(f"{path} compared {r.model}, {paths[0]} compared {first.model}; pool runs of one model.")
        differ = sorted(k for k in first.config.keys() & r.config.keys() - POOL_FREE if first.config[k] != r.config[k])
        if differ:
            shown = ", ".join(f"{k} ({first.config[k]!r} vs {r.config[k]!r})" for k in differ[:4])
            raise UserError(f"{paths[0]} and {path} ran with different options: {shown}; pool only runs of the "
                            "same settings.")
    by_seed: dict[int, SeedComparison] = {}
    for path, r in zip(paths, runs):
        for s in r.per_seed:
            if s.seed not in by_seed:
                by_seed[s.seed] = dataclasses.replace(s, outcomes=dict(s.outcomes), ap_minus=dict(s.ap_minus))
                continue
            kept = by_seed[s.seed]
            for name, o in s.outcomes.items():
                if name not in kept.outcomes:
                    kept.outcomes[name] = o
                elif kept.outcomes[name].mask != o.mask:
                    raise UserError(f"Seed {s.seed}: {name} chose different masks in two of the runs ({path} is "
                                    "one): different code, or another machine's float rounding; pool runs that "
                                    "share no seed, or rerun all of that seed's methods in one comparison.")
            for name, d in s.ap_minus.items():
                kept.ap_minus.setdefault(name, d)
            kept.knockouts = kept.knockouts or s.knockouts
            # its seconds are not comparable across machines, nor its choices across code
            kept.machine = _merged(kept.machine, s.machine,
                                   "its methods ran on different machines (see the pooled runs)")
            kept.code = _merged(kept.code, s.code, "its methods ran different code (see the pooled runs)")
    methods = list(dict.fromkeys(m for r in runs for m in r.methods))
    seeds = sorted(by_seed)
    per_seed = [by_seed[k] for k in seeds]
    for s in per_seed:  # keep every seed's rows in one method order
        s.outcomes = {m: s.outcomes[m] for m in methods if m in s.outcomes}
    result = Comparison(model=first.model, config={**first.config, "seeds": ",".join(map(str, seeds))},
                        methods=methods, seeds=seeds, rule=first.rule, per_seed=per_seed,
                        seconds=sum(r.seconds for r in runs), sources=[str(p) for p in paths])
    result.summary = summarize(result, first.config["tau"], level)
    log(f"pooled {len(paths)} comparisons: seeds {', '.join(map(str, result.seeds))}; methods {', '.join(methods)}")
    mixed = code_mix(result)
    if mixed:
        log(f"warning: {mixed}")
    return result
