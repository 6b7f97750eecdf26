"""A front of repaired models from one repair's store: the confirmed choice at each perplexity budget.

``attnprune front RUN_DIR --budgets 1,2.5,5,10`` applies the repair's own selection policy
(the same confirmation data, screen and confidence) with each budget in turn to the
validation evaluations its store already holds. A confirmation already in the store is read,
not measured again, so a budget costs only the confirmations of masks no earlier choice
confirmed. Nothing here reads the test split unless ``--test`` asks for each point's test
numbers (paired with the unrepaired model on the same prompts and windows).

The search behind the store aimed at the repair's budget: budgets far from it choose among
fewer nearby candidates, so the front is what this store supports, not the best mask at each
budget. ``front.md`` says which budget the search used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from attnprune import labels
from attnprune.config import FrontConfig, RepairConfig
from attnprune.errors import UserError
from attnprune.results import (Choice, ConfirmationSummary, Front, FrontPoint, FrontTest, RepairReport, measured,
                               read_result)
from attnprune.run import Log, Run
from attnprune.selection import SelectionPolicy

logger = logging.getLogger("attnprune")

FRONT_FILE = "front.json"


def read_report(run_dir: Path) -> RepairReport:
    """The ``report.json`` of a finished repair, or one sentence saying what to pass instead."""
    src = run_dir / "report.json"
    return read_result(RepairReport, src, f"{src} does not exist; pass the output directory of a finished repair.",
                       f"{src} is not a report of this attnprune version ({{error}}); rerun the repair (it reuses the "
                       "stored evaluations).")


def repair_config(report: RepairReport, run_dir: Path) -> RepairConfig:
    """The configuration the repair ran with, pointed at ``run_dir`` (no export)."""
    known = {f.name for f in dataclasses.fields(RepairConfig)}
    values = {k: v for k, v in report.config.items() if k in known}
    values.setdefault("hold_tokens", 0)  # a report from before --hold-tokens chose with the bound on the change itself
    return RepairConfig(**{**values, "out": str(run_dir), "export": False})


def front(cfg: FrontConfig, loaded=None, log: Log = logger.info) -> Front:
    """The front of ``cfg.run`` at ``cfg.budgets``; writes ``front.json``, ``front.md`` and ``front.png`` there."""
    cfg.validate()
    run_dir = Path(cfg.run)
    report = read_report(run_dir)
    rcfg = repair_config(report, run_dir)
    policy = SelectionPolicy.of(rcfg)
    if policy.confirm <= 0:
        raise UserError("This repair chose without a confirmation (--confirm 0), so its store has no fresh-data "
                        "numbers to put on a front; rerun the repair with --confirm above 0.")
    t_all = time.perf_counter()
    with Run.open(rcfg, loaded, log) as run:
        base = run.base()
        rows = run.rows()
        source = labels.confirm("ap")
        points = []
        for budget in cfg.budget_list:
            before = run.evaluated()
            t = time.perf_counter()
            selection = dataclasses.replace(policy, tau=budget).select(rows, base, run.confirm, source,
                                                                       guard=run.guard)
            chosen = selection.summary(policy)
            if chosen is not None:
                chosen.mask, chosen.key = selection.chosen.mask.to_dict(run.model_name), selection.chosen.mask.key
            point = FrontPoint(budget=budget, new_confirmations=len(run.evaluated() - before),
                               seconds=time.perf_counter() - t, chosen=chosen)
            points.append(point)
            k = chosen.confirmed if chosen is not None else None
            log(f"budget +{100 * budget:g}%: " + ("no admissible mask" if chosen is None else
                f"{chosen.n_pruned} heads, confirmed bias {k.bias:.3f} [{k.ci[0]:.3f}, {k.ci[1]:.3f}], perplexity "
                f"{100 * k.perplexity_change:+.1f}% (bound {100 * k.perplexity_change_bound:+.1f}%)")
                + f" ({point.new_confirmations} new confirmations)")
        _, base_c = run.confirm([], source)
        result = Front(
            model=run.model_name, run=str(run_dir), search_budget=rcfg.tau, rule=policy.rule(),
            confidence=policy.confidence, candidates=len(rows),
            confirmation=ConfirmationSummary(setup=run.evaluator(run.confirm_spec)[0].setup(),
                                             unrepaired=measured(base_c)),
            guards=list(policy.guards), guard_margin=policy.guard_margin, guard_test=policy.guard_test,
            points=points,
            seconds={"confirmations": sum(p.seconds for p in points)})
        if cfg.test:
            result.test = _test_points(run, rcfg, points)
        result.seconds["total"] = time.perf_counter() - t_all
    write_front(result, run_dir)
    return result


def _test_points(run: Run, rcfg: RepairConfig, points: list[FrontPoint]) -> dict[str, FrontTest]:
    """Each distinct chosen mask against the unrepaired model on the TEST split (claims, never choices)."""
    from attnprune.heads import HeadMask

    masks = list(dict.fromkeys(HeadMask.from_dict(p.chosen.mask) for p in points if p.chosen))
    comparisons = run.bench.compare(rcfg.bias, masks) if masks else []
    return {m.key: FrontTest(bias=comp.repaired.bias, ci=list(comp.repaired.ci), bias_change=comp.bias_change,
                             unrepaired_bias=comp.unrepaired.bias, setup=comp.setup,
                             perplexity_change=comp.perplexity_change, perplexity_change_ci=comp.perplexity_change_ci)
            for m, comp in zip(masks, comparisons)}


def write_front(result: Front, out: Path) -> dict[str, Path]:
    """``front.json``, ``front.md`` and ``front.png`` in ``out``."""
    paths = {"json": out / FRONT_FILE, "md": out / "front.md", "png": out / "front.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


def markdown(result: Front) -> str:
    """The front as a table, with what it was measured on."""
    conf = result.confirmation
    pi = conf.setup.perplexity_inputs
    u = conf.unrepaired
    lines = [
        f"# Front of repaired models: {result.model}", "",
        f"The repair's selection rule at each budget, applied to the {result.candidates} validation evaluations of "
        f"`{result.run}` (its search aimed at +{100 * result.search_budget:g}%). Numbers are on the "
        f"confirmation data ({conf.setup.prompts} fresh validation prompts, {pi.get('tokens_scored')} tokens of "
        f"{pi.get('corpus')} {pi.get('split')}), never seen by the search. Guards: "
        + result.guard_words() + ".", "",
        f"Rule, as written for the search budget (each row applies it with its own budget in place of "
        f"+{100 * result.search_budget:g}%): {result.rule}.", "",
        "| budget | heads | confirmed bias [95% CI] | perplexity change | one-sided "
        f"{100 * result.confidence:.0f}% bound | new confirmations |",
        "|---|---|---|---|---|---|",
        f"| unrepaired | 0 | {u.bias:.3f} [{u.ci[0]:.3f}, {u.ci[1]:.3f}] | - | - | - |",
    ]
    for p in result.points:
        c = p.chosen
        if c is None:
            lines.append(f"| +{100 * p.budget:g}% | - | no admissible mask | - | - | {p.new_confirmations} |")
            continue
        k = c.confirmed
        lines.append(f"| +{100 * p.budget:g}% | {c.n_pruned} | {k.bias:.3f} [{k.ci[0]:.3f}, {k.ci[1]:.3f}] | "
                     f"{100 * k.perplexity_change:+.1f}% | {100 * k.perplexity_change_bound:+.1f}% | "
                     f"{p.new_confirmations} |")
    lines += ["", f"Confirmations took {result.seconds['confirmations']:.0f} s; the whole command "
                  f"{result.seconds['total']:.0f} s.", ""]
    if result.test:
        lines += ["## TEST split (claims; the choices above used validation only)", "",
                  "| budget | heads | test bias [95% CI] | bias change [paired 95% CI] | perplexity change [95% CI] |",
                  "|---|---|---|---|---|"]
        for p in result.points:
            c = p.chosen
            t = result.test.get(c.key) if c else None
            if t is None:
                continue
            ch, ppl_ci = t.bias_change, t.perplexity_change_ci
            ppl = f"{100 * t.perplexity_change:+.1f}%" + (
                f" [{100 * ppl_ci[0]:+.1f}%, {100 * ppl_ci[1]:+.1f}%]" if ppl_ci else "")
            lines.append(f"| +{100 * p.budget:g}% | {c.n_pruned} | {t.bias:.3f} [{t.ci[0]:.3f}, {t.ci[1]:.3f}] | "
                         f"{100 * ch.relative:+.1f}% [{ch.ci[0]:+.3f}, {ch.ci[1]:+.3f}] | {ppl} |")
        lines.append("")
    lines += ["Export a point: `attnprune export --from RUN_DIR --budget B --out DIR` (B in percent).", ""]
    return "\n".join(lines)


def distinct_choices(points: list[FrontPoint]) -> list[tuple[Choice, list[float]]]:
    """Each distinct chosen mask once, in budget order, with the budgets that chose it (one label per plotted point)."""
    out: dict[str, tuple[Choice, list[float]]] = {}
    for p in points:
        if p.chosen is not None:
            out.setdefault(p.chosen.key, (p.chosen, []))[1].append(p.budget)
    return list(out.values())


def plot(result: Front, path: Path) -> None:
    """Confirmed bias (95% CI) against confirmed perplexity change, the front's points joined in budget order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = result.confirmation.unrepaired
    distinct = distinct_choices(result.points)
    chosen = [c for c, _ in distinct]
    xs = [0.0] + [100 * c.confirmed.perplexity_change for c in chosen]
    ys = [u.bias] + [c.confirmed.bias for c in chosen]
    lo = [u.ci[0]] + [c.confirmed.ci[0] for c in chosen]
    hi = [u.ci[1]] + [c.confirmed.ci[1] for c in chosen]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]], fmt="o-",
                capsize=3, color="tab:blue", label="front (confirmation data)")
    ax.annotate("unrepaired", (xs[0], ys[0]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for (c, budgets), x, y in zip(distinct, xs[1:], ys[1:]):
        ax.annotate(f"{', '.join(f'+{100 * b:g}%' for b in budgets)}: {c.n_pruned} head{'s' * (c.n_pruned != 1)}",
                    (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(x=0.25)
    ax.set_xlabel("perplexity change on confirmation text (%)")
    ax.set_ylabel("bias on confirmation prompts")
    ax.set_title(f"{result.model}: bias vs perplexity budget", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def front_point(run_dir: Path, budget_percent: float) -> tuple[FrontPoint, Front]:
    """The point of ``run_dir``'s front at ``budget_percent`` and the front, or one sentence saying how to get it."""
    path = run_dir / FRONT_FILE
    result = read_result(Front, path, f"{path} does not exist; run `attnprune front {run_dir} --budgets "
                                      f"{budget_percent:g}` first.",
                         f"{path} is not a front of this attnprune version ({{error}}); run `attnprune front {run_dir} "
                         f"--budgets {budget_percent:g}` again (it reuses the stored confirmations).")
    point = result.point(budget_percent / 100)
    if point is None:
        have = ", ".join(f"{100 * p.budget:g}" for p in result.points)
        raise UserError(f"The front of {run_dir} has no point at +{budget_percent:g}% (it has {have}); run "
                        f"`attnprune front {run_dir} --budgets {budget_percent:g}` to add it.")
    if point.chosen is None:
        raise UserError(f"The front of {run_dir} has no admissible mask at +{budget_percent:g}%; choose "
                        "another budget of front.md.")
    return point, result
