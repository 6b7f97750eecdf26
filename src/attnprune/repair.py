"""The Attention Pruning repair as a short composition: method, choice, test split, export, report.

``repair(cfg)`` opens a :class:`~attnprune.run.Run`, lets the ``ap`` method propose and
validate candidates (:mod:`attnprune.methods.ap`), chooses with the shared
:class:`~attnprune.selection.SelectionPolicy` on validation, measures the choice against
the unrepaired model on the TEST split, exports the repaired model and writes the report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from attnprune.compare import propose_and_select
from attnprune.config import FrontConfig, RepairConfig, command_line, split_list
from attnprune.front import front
from attnprune.heads import HeadMask
from attnprune.machine import code_version, describe_machine
from attnprune.methods import MethodContext
from attnprune.results import (ConfirmationSummary, EvaluationCounts, RepairReport, ValidationPoint,
                               ValidationSummary, measured)
from attnprune.run import Log, Run
from attnprune.selection import Selection, SelectionPolicy

logger = logging.getLogger("attnprune")


def confirmation_summary(run: Run, selection: Selection) -> ConfirmationSummary | None:
    """What the confirmation measured: its setup, the unrepaired model and every confirmed candidate."""
    if selection.base_confirmed is None:
        return None
    return ConfirmationSummary(setup=run.evaluator(run.confirm_spec)[0].setup(),
                               unrepaired=measured(selection.base_confirmed), candidates=selection.candidates,
                               evaluation_seconds=selection.confirmation_seconds)


@dataclass
class RepairResult:
    """What a repair produced: the chosen mask, the report, and where the files are."""

    mask: HeadMask
    report: RepairReport
    out_dir: Path
    model_dir: Path | None


def repair(cfg: RepairConfig, loaded=None, log: Log = logger.info) -> RepairResult:
    """Run the whole Attention Pruning repair and write its outputs (see module docstring)."""
    from attnprune.report import write_report

    t_start = time.perf_counter()
    code = code_version()  # at the start: the modules this process runs were read then, whatever is committed later
    policy = SelectionPolicy.of(cfg)
    with Run.open(cfg, loaded, log) as run:
        lay = run.layout
        log(f"{run.model_name}: {lay.summary()}; output {cfg.out_dir}")
        evals_before = run.store.count()
        base = run.base()
        budget = policy.budget(base)
        log(f"unrepaired (valid): bias {base.bias:.3f} [{base.bias_ci[0]:.3f}, {base.bias_ci[1]:.3f}], "
            f"perplexity {base.perplexity:.2f}; budget {budget.limit:.2f}")
        attempt = propose_and_select(run, MethodContext(run, policy, cfg.seed), policy, "ap", base, require=True)
        proposal, selection, n_confirmed = attempt.proposal, attempt.selection, attempt.confirmations
        chosen = selection.chosen
        log(f"chosen (valid): {chosen.mask.n_pruned} heads pruned, bias {chosen.bias:.3f}, perplexity "
            f"{chosen.perplexity:.2f} (from {chosen.source})"
            + (f"; confirmed on fresh validation data: bias {selection.confirmed.bias:.3f} vs unrepaired "
               f"{selection.base_confirmed.bias:.3f}, perplexity {100 * selection.summary().confirmed.perplexity_change:+.1f}%"
               if selection.confirmed is not None else ""))
        out = cfg.out_dir
        # saved before the test split: the choice survives any failure of the reporting steps
        chosen.mask.save(out / "mask.json", model=run.model_name, source=chosen.source,
                         validation_bias=chosen.bias, validation_perplexity=chosen.perplexity)
        test = run.bench.report(chosen.mask)
        rows = run.rows()
        report = RepairReport(
            model=run.model_name, layout=lay.describe(), config=cfg.to_dict(),
            validation=ValidationSummary(
                setup=run.valid.setup(),
                unrepaired=measured(base), chosen=selection.summary(policy),
                budget=budget.limit, rule=policy.rule(),
                points=[ValidationPoint(r.mask.n_pruned, r.bias, r.perplexity, r.source, r.mask.key) for r in rows],
                confirmation=confirmation_summary(run, selection)),
            search=proposal.details, chosen_mask=chosen.mask.to_dict(run.model_name), test=test,
            llm_evaluations=EvaluationCounts(
                validation=len(proposal.rows),
                confirmation=n_confirmed + (1 if selection.base_confirmed is not None else 0),
                new_this_run=run.store.count() - evals_before, in_store=run.store.count(), guards=attempt.guards,
                evaluation_seconds=attempt.evaluation_seconds + (
                    selection.base_confirmed.seconds if selection.base_confirmed is not None else 0)),
            timings_s={}, outputs={"store": str(run.store.path), "mask": str(out / "mask.json"), "model": None},
            machine=describe_machine(cfg.device), code=code)
        model_dir = None
        if cfg.export:
            from attnprune.export import export_repaired, model_card

            source = run.loaded.source
            card = model_card(chosen.mask, run.model_name, source.get("base_model"), source.get("license", "other"),
                              report, command_line("repair", cfg), total_heads=lay.n_total)
            model_dir = export_repaired(run.loaded.model, run.loaded.tokenizer, lay, chosen.mask, out / "model",
                                        model_name=run.model_name, card=card,
                                        provenance={"method": "attention-pruning", "config": cfg.to_dict(),
                                                    "test_split": test.search_measure.repaired.to_dict(),
                                                    "attnprune_code": code})  # the report's, not a later commit
            report.outputs["model"] = str(model_dir)
        report.timings_s = {**run.timings, "total": time.perf_counter() - t_start}
    write_report(report, out)
    if split_list(cfg.budgets):
        t = time.perf_counter()
        front(FrontConfig(run=str(out), budgets=cfg.budgets), loaded=run.loaded, log=log)
        report.timings_s["front"] = time.perf_counter() - t
        write_report(report, out)
    return RepairResult(chosen.mask, report, out, model_dir)
