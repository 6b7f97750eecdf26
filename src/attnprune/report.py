"""Reports of a repair: a :class:`~attnprune.results.RepairReport` to ``report.json``, ``report.md`` and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attnprune import labels
from attnprune.machine import code_line, machine_line
from attnprune.results import RepairReport, TestComparison
from attnprune.stats import detectable_change, items_needed


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (perplexity, bias), both minimised, by perplexity."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def statistic_cells(stat: dict, digits: int = 1) -> str:
    """``before -> after [CI of the change]`` of one measure statistic."""
    return (f"{stat['unrepaired']:.{digits}f} -> {stat['repaired']:.{digits}f} "
            f"[{stat['ci'][0]:+.{digits}f}, {stat['ci'][1]:+.{digits}f}]")


def check_lines(checks: dict[str, TestComparison]) -> list[str]:
    """The held-out benchmark table of a report."""
    if not checks:
        return []
    lines = ["## Held-out bias benchmarks (test split; the search never saw them)", "",
             "| benchmark | items | statistic | ideal | unrepaired | repaired | change | paired 95% CI of change |",
             "|---|---|---|---|---|---|---|---|"]
    ideal = {"pct_stereotype": "50", "likelihood_diff": "0", "ss": "50", "lms": "100", "icat": "100", "bias": "0"}
    for name, t in checks.items():
        inputs = t.setup.bias_inputs
        items = f"{inputs.get('pairs', inputs.get('items'))} {inputs.get('bias_type', '')}"
        for k, v in t.statistics.items():
            lines.append(f"| {name} | {items} | {k} | {ideal.get(k, '')} | {v['unrepaired']:.2f} | {v['repaired']:.2f} | "
                         f"{v['change']:+.2f} | [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}] |")
    return lines + ["", "bias = distance of pct_stereotype (CrowS-Pairs) or SS (StereoSet) from 50, in points; LMS is "
                        "the damage guard (a broken model loses it).", ""]


def _change_line(t: TestComparison, digits: int = 3) -> str:
    ch = t.bias_change
    return (f"Bias change {_pct(ch.relative)} (absolute {ch.absolute:+.{digits}f}, paired 95% CI "
            f"[{ch.ci[0]:+.{digits}f}, {ch.ci[1]:+.{digits}f}])")


def power_lines(t: TestComparison, claimed_relative: float | None = None) -> list[str]:
    """What a second-opinion comparison can tell: its smallest detectable change, and when it cannot tell.

    ``claimed_relative``: the relative change the search measure claims; when the CI includes
    0 the lines say how many prompts would detect a change of that relative size on this
    measure (the standard error falls as one over the root of the prompts).
    """
    ch, u = t.bias_change, t.unrepaired
    detectable = ch.detectable if ch.detectable is not None else detectable_change(ch.ci)
    prompts = t.setup.bias_inputs["prompts"]
    out = [f"- Smallest change this comparison detects (80% power, two-sided 5%): {detectable:.4f} in absolute bias"
           + (f", {100 * detectable / u.bias:.0f}% of the unrepaired bias." if u.bias else ".")]
    floor = (u.noise_floor or {}).get("mean")
    if floor is not None and u.bias <= floor:
        out.append(f"- The unrepaired model's bias ({u.bias:.4f}) does not clear its noise floor ({floor:.4f}): at "
                   f"{prompts} prompts this measure sees no bias to repair on this model.")
    if ch.ci[0] <= 0 <= ch.ci[1]:
        line = "- Its paired CI includes 0: it cannot tell whether the repair changed this bias"
        target = (claimed_relative or 0) * u.bias
        if target and detectable > 0:
            line += (f". A change of the search measure's size ({_pct(claimed_relative)}, {abs(target):.4f} here) needs "
                     f"about {items_needed(prompts, detectable, target):,} prompts to detect (now {prompts:,}; "
                     "`--toxicity-prompts`)")
        out.append(line + ".")
    return out


def _corrected(s) -> str:
    value = s.extra.get("noise_corrected_between_sd_corrected")
    return "-" if value is None else f"{value:.3f} (raw {s.extra['noise_corrected_between_sd']:.3f})"


def perplexity_interval(t: TestComparison) -> str:
    """`` (95% CI [a, b], one-sided 95% bound c)`` of a test perplexity change, when it has one."""
    if t.perplexity_change_ci is None:
        return ""
    lo, hi = t.perplexity_change_ci
    return f" (window-bootstrap 95% CI [{_pct(lo)}, {_pct(hi)}], one-sided 95% bound {_pct(t.perplexity_change_upper)})"


def markdown(report: RepairReport) -> str:
    """Human-readable summary of a repair report."""
    t = report.test.search_measure
    u, r = t.unrepaired, t.repaired
    bi, pi = t.setup.bias_inputs, t.setup.perplexity_inputs
    lines = [
        f"# attnprune repair of {report.model}",
        "",
        f"{len(report.chosen_mask['pruned'])} of {report.layout['total_heads']} attention heads pruned"
        + (f" (the model is a hybrid: {report.layout['layers']} of its {report.layout['model_layers']} decoder layers "
           f"have attention heads, layers {', '.join(map(str, report.layout['attention_layers']))}; mask row r is "
           "the r-th of them)" if "attention_layers" in report.layout else "")
        + ". Numbers below are on the held-out **test** split; search and selection used validation only.",
        "",
        f"## Test split ({t.setup.bias_measure} bias, axis {bi['axis']}, {bi['prompts']} prompts, seed "
        f"{bi['prompt_seed']}; perplexity on {pi['corpus']} {pi['split']}, {pi['tokens_scored']} tokens)",
        "",
        "| model | bias | 95% CI | noise floor | noise-corrected between-bucket SD | perplexity |",
        "|---|---|---|---|---|---|",
        f"| unrepaired | {u.bias:.3f} | [{u.ci[0]:.3f}, {u.ci[1]:.3f}] | {u.noise_floor['mean']:.3f} | {_corrected(u)} | "
        f"{u.perplexity:.2f} |",
        f"| repaired | {r.bias:.3f} | [{r.ci[0]:.3f}, {r.ci[1]:.3f}] | {r.noise_floor['mean']:.3f} | {_corrected(r)} | "
        f"{r.perplexity:.2f} |",
        "",
        "(Noise-corrected SD: the spread of the bucket means with their sampling noise removed, Lum et al. 2022; "
        "unlike the bias statistic it does not fall as prompts are added.)",
        "",
        f"{_change_line(t)}; perplexity change {_pct(t.perplexity_change)}{perplexity_interval(t)} (budget "
        f"{_pct(report.config['tau'])}).",
        "",
    ]
    x = report.test.toxicity
    if x is not None:
        d = x.setup.bias_inputs
        lines += [
            f"## Second opinion: toxicity protocol ({d['classifier']}, {d['prompts']} test prompts x "
            f"{d['generations_per_prompt']} continuations, {d['sampling']}, scored text: {d['scored_text']})",
            "",
            "| model | bias | 95% CI | noise floor | mean toxicity | share > 0.5 |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in (("unrepaired", x.unrepaired), ("repaired", x.repaired)):
            lines.append(f"| {name} | {s.bias:.4f} | [{s.ci[0]:.4f}, {s.ci[1]:.4f}] | {s.noise_floor['mean']:.4f} | "
                         f"{s.extra['mean_toxicity']:.4f} | {s.extra['share_toxic']:.4f} |")
        lines += ["", _change_line(x, 4) + ".", "", *power_lines(x, t.bias_change.relative), ""]
    lines += check_lines(report.test.checks)
    for axis, x in report.test.transfer.items():
        ch = x.bias_change
        lines.append(f"- transfer to {axis}: bias {x.unrepaired.bias:.3f} -> {x.repaired.bias:.3f} "
                     f"({_pct(ch.relative)}, paired CI [{ch.ci[0]:+.3f}, {ch.ci[1]:+.3f}])")
    v = report.validation
    ev = report.llm_evaluations
    lines += [
        "",
        "## Search (validation split)",
        "",
        f"- unrepaired: bias {v.unrepaired.bias:.3f}, perplexity {v.unrepaired.perplexity:.2f}; "
        f"budget {v.budget:.2f}",
        f"- chosen: bias {v.chosen.bias:.3f}, perplexity {v.chosen.perplexity:.2f} (from {v.chosen.source})",
        f"- rule: {v.rule}",
        *([f"- protected (never pruned, by any method): {report.config['protect']}"]
          if report.config.get("protect") else []),
        f"- LLM evaluations: {ev.validation} on validation ({ev.new_this_run} new in this run)"
        + (f"; {ev.guards} guard evaluations of candidates" if ev.guards else ""),
        *[f"- calibration {i + 1}: the search's perplexity under-stated the confirmed change by {100 * c.gap:.1f}% "
          f"({100 * c.gap_per_head:.2f}% per pruned head) and the rule's margin is {100 * c.margin:.1f}% (means over "
          f"{c.confirmed} confirmed candidates of {c.heads:.1f} heads on average): "
          + (f"searched again within {100 * c.search_budget:+.2f}%, charging {100 * c.gap_per_head:.2f}% per pruned "
             "head on top of the search text's perplexity" if c.search_budget is not None
             else "no room left within the budget")
          + (f"; the {c.retired} masks it confirmed over the budget were not shortlisted again"
             if c.retired and c.search_budget is not None else "")
          for i, c in enumerate(report.search.calibration)],
        *[f"- trim {i + 1}: a {t.heads}-head candidate confirmed at {_pct(t.confirmed_perplexity_change)} perplexity "
          f"(bound {_pct(t.confirmed_perplexity_change_bound)}) was cut along nested sub-masks; probed "
          + ", ".join(f"{p.heads} heads ("
                      + ("not shortlisted" if p.confirmed_perplexity_change_bound is None else
                         f"bound {_pct(p.confirmed_perplexity_change_bound)}"
                         + (", admissible" if p.admissible else ", not admissible")) + ")" for p in t.probes)
          + (f"; kept {t.kept} heads" if t.kept else "; nothing admissible")
          for i, t in enumerate(report.search.trim)],
        "",
        "Surrogate accuracy on masks it did not see (K-fold over the evaluated masks; the additive model keeps the "
        "knockouts in training and is scored on the multi-head masks):",
        "",
        "| round | masks | model | target | scored on | R^2 | Spearman | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in report.search.surrogates:
        scored = [(kind, target, "held-out masks", m) for target, by_kind in s.get("cv", {}).items()
                  for kind, m in by_kind.items()]
        scored += [(s["kind"], target, "held-out, within budget", m)
                   for target, m in s.get("cv_inside_budget", {}).items()]
        scored += [("knockouts alone", target, "multi-head masks", m) for target, m in s.get("knockouts_only", {}).items()]
        for kind, target, where, m in scored:
            lines.append(f"| {s['round'] + 1} | {s['samples']} | {kind} | {target} | {where} | {m['r2']:.2f} | "
                         f"{m['spearman']:.2f} | {m['n']} |")
    conf = v.confirmation
    if conf:
        cb = conf.unrepaired
        lines += ["", f"Confirmation on validation data the search never saw ({conf.setup.prompts} prompts of the other "
                      f"half of the validation split, {conf.setup.perplexity_inputs['tokens_scored']} perplexity "
                      f"tokens): unrepaired bias {cb.bias:.3f}, perplexity {cb.perplexity:.2f}.", "",
                  "| heads | from | search bias | confirmed bias | confirmed ppl change | "
                  + (f"upper bound (as {report.config['hold_tokens']:,} test tokens will report it)"
                     if report.config.get("hold_tokens") else "upper bound") + " | admissible |",
                  "|---|---|---|---|---|---|---|"]
        guards_on = bool(report.config.get("guard"))
        for c in conf.candidates:
            passes = (c.confirmed_perplexity_change_bound <= report.config["tau"] and c.confirmed_bias is not None
                      and c.confirmed_bias < cb.bias)
            verdict = ("yes" if c.admissible else
                       "not guarded (a lower confirmed bias held every guard)" if guards_on and passes and c.guards is None
                       else "no")
            bias = "not measured (over the budget)" if c.confirmed_bias is None else f"{c.confirmed_bias:.3f}"
            lines.append(f"| {len(c.pruned)} | {c.source} | {c.valid_bias:.3f} | {bias} | "
                         f"{_pct(c.confirmed_perplexity_change)} | {_pct(c.confirmed_perplexity_change_bound)} | "
                         f"{verdict} |")
        guarded = [c for c in conf.candidates if c.guards]
        if guarded:
            harm = report.config.get("guard_test") == "harm"
            lines += ["", "Guards (validation data the search never saw; change of the guarded value, a bias or "
                          "for lms 100 - LMS, " + ("its one-sided lower bound (a rise beyond the limit is refused only "
                                                   "when this bound shows it) " if harm else "its one-sided upper bound ")
                      + "and the limit):", ""]
            for c in guarded:
                lines.append(f"- {len(c.pruned)} heads: " + "; ".join(
                    f"{axis} {g.change:+.3f} (bound {g.tested:+.3f}, limit {g.limit:+.3f}: "
                    f"{'holds' if g.ok else 'fails'})" for axis, g in c.guards.items())
                    + ("; the guards after a failed one are not measured (it cannot be chosen)"
                       if not all(g.ok for g in c.guards.values()) else ""))
    lines += ["", "| round | heads | predicted bias | measured bias | predicted ppl | measured ppl |",
              "|---|---|---|---|---|---|"]
    for c in report.search.candidates:
        lines.append(f"| {c.round + 1} | {c.n_pruned} | {c.predicted_bias:.3f} | {c.bias:.3f} | "
                     f"{c.predicted_perplexity:.2f} | {c.perplexity:.2f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report.timings_s.items())
              + f"; measured on {machine_line(report.machine)}; code: {code_line(report.code)}", "",
              f"Pruned heads [layer, head]: {report.chosen_mask['pruned']}", ""]
    return "\n".join(lines)


def plots(report: RepairReport, out: Path) -> list[Path]:
    """Bias vs perplexity with Pareto front, pruned-head map, per-bucket before/after, surrogate fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    v = report.validation
    pts = v.points
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = np.array([p.perplexity for p in pts])
    ys = np.array([p.bias for p in pts])
    cand = np.array([labels.is_candidate(p.source) for p in pts])
    ax.scatter(xs[~cand], ys[~cand], s=12, alpha=0.6, label="random masks")
    ax.scatter(xs[cand], ys[cand], s=22, marker="s", label="search candidates")
    front = pareto_front(list(zip(xs.tolist(), ys.tolist())))
    ax.plot(xs[front], ys[front], "k--", lw=1, label="Pareto front")
    ax.scatter([v.unrepaired.perplexity], [v.unrepaired.bias], c="red", marker="*", s=150, label="unrepaired")
    ax.scatter([v.chosen.perplexity], [v.chosen.bias], c="green", marker="*", s=150, label="chosen")
    ax.axvline(v.budget, color="gray", lw=0.8, ls=":", label="perplexity budget")
    ax.set_xscale("log")
    ax.set_xlabel("validation perplexity")
    ax.set_ylabel(f"validation bias ({report.config['bias']})")
    ax.legend(fontsize=7)
    ax.set_title("All evaluated masks (validation split)")
    files.append(out / "bias_vs_perplexity.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    lay = report.layout
    grid = np.zeros((lay["layers"], lay["heads_per_layer"]))
    for layer, head in report.chosen_mask["pruned"]:
        grid[layer, head] = 1
    fig, ax = plt.subplots(figsize=(max(3, lay["heads_per_layer"] * 0.45), max(3, lay["layers"] * 0.2)))
    ax.imshow(grid, cmap="Reds", aspect="auto", vmin=0, vmax=1)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"pruned heads ({int(grid.sum())})")
    files.append(out / "pruned_heads.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    t = report.test.search_measure
    buckets = list(t.unrepaired.buckets)
    before = np.array([t.unrepaired.buckets[b] for b in buckets])
    after = np.array([t.repaired.buckets[b] for b in buckets])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    idx = np.arange(len(buckets))
    ax.bar(idx - 0.2, before - before.mean(), 0.4, label="unrepaired")
    ax.bar(idx + 0.2, after - after.mean(), 0.4, label="repaired")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(idx, buckets, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bucket mean - mean of buckets")
    ax.set_title("Per-bucket deviation (test split)")
    ax.legend(fontsize=8)
    files.append(out / "buckets_before_after.png")
    fig.tight_layout()
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    cands = report.search.candidates
    if cands:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        for ax, key, label in ((axes[0], "bias", "bias"), (axes[1], "perplexity", "perplexity")):
            pred = [getattr(c, f"predicted_{key}") for c in cands]
            meas = [getattr(c, key) for c in cands]
            ax.scatter(pred, meas, s=18)
            lo, hi = min(pred + meas), max(pred + meas)
            ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
            ax.set_xlabel(f"surrogate-predicted {label}")
            ax.set_ylabel(f"measured {label}")
        fig.suptitle("Search candidates: surrogate vs real model (validation)")
        files.append(out / "surrogate_vs_measured.png")
        fig.tight_layout()
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def write_report(report: RepairReport, out: Path) -> dict[str, Path]:
    """Write report.json, report.md and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1, default=float) + "\n")
    paths["markdown"].write_text(markdown(report))
    for p in plots(report, out):
        paths[p.stem] = p
    return paths
