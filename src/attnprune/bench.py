"""The test bench of a run: chosen masks against the unrepaired model on the TEST split.

Split from :class:`~attnprune.run.Run` (the validation session: evaluate, confirm, the
store's rows) so that what reads the test split is in one place. Every test evaluation is
stored under ``test:{name}`` in the run's store, evaluated once and read back after; the
unrepaired model is measured on the same items, so every change comes with a paired CI.
Nothing here chooses a mask.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, Sequence

from attnprune import labels
from attnprune.config import TestedRunConfig, split_list
from attnprune.evaluation import Evaluator
from attnprune.heads import HeadMask
from attnprune.results import Change, Summary, TestComparison, TestReport
from attnprune.stats import detectable_change, percentile_ci, window_bootstrap
from attnprune.store import StoredEvaluation


class Host(Protocol):
    """What the bench needs from the run behind it (:class:`attnprune.run.Run` has it)."""

    cfg: TestedRunConfig
    shape: tuple[int, int]

    def log(self, message: str) -> None: ...
    def timed(self, stage: str) -> AbstractContextManager: ...
    def spec(self, split: str = ..., bias: str | None = ..., axis: str | None = ..., prompts: int | None = ...,
             ppl_tokens: int | None = ..., bootstrap_reps: int | None = ..., part: str | None = ...,
             extra: dict | None = ...) -> Any: ...
    def evaluator(self, spec: Any, with_perplexity: bool = ...) -> tuple[Evaluator, str]: ...
    def stored_rows(self, ev: Evaluator, setting: str, split: str, source: str, masks: Sequence[HeadMask],
                    with_perplexity: bool, log_name: str | None = ...) -> dict[HeadMask, StoredEvaluation]: ...


class TestBench:
    """Test-split comparisons, held-out checks, transfer axes and paired differences of a run's masks."""

    __test__ = False  # not a pytest test class

    def __init__(self, run: Host):
        self.run = run

    def compare(self, name: str, masks: Sequence[HeadMask], bias: str | None = None, axis: str | None = None,
                prompts: int | None = None, extra: dict | None = None,
                with_perplexity: bool = True) -> list[TestComparison]:
        """Each of ``masks`` vs the unrepaired model on the TEST split, stored and paired on the same items."""
        c = self.run.cfg
        ev, rows = self.rows(name, masks, bias, axis, prompts, extra, with_perplexity)
        base = HeadMask.all_active(*self.run.shape)
        out = []
        for m in masks:
            b, r = rows[base], rows[m]
            paired = ev.bias_measure.paired_difference(b.prompt_scores, r.prompt_scores)
            # repaired - unrepaired, with the paired bootstrap CI (same items, same resamples)
            ci = [-paired["diff_ci"][1], -paired["diff_ci"][0]]
            change = Change(absolute=-paired["diff"], ci=ci, relative=-paired["diff"] / b.bias if b.bias else float("nan"),
                            detectable=detectable_change(ci))
            stats = {k: {"unrepaired": v["a"], "repaired": v["b"], "change": -v["diff"],
                         "ci": [-v["diff_ci"][1], -v["diff_ci"][0]]} for k, v in paired.get("statistics", {}).items()}
            out.append(TestComparison(
                name=name, setup=ev.setup(), card=ev.bias_measure.card.to_dict(),
                unrepaired=_summary(b, with_perplexity), repaired=_summary(r, with_perplexity), bias_change=change,
                statistics=stats, **(_perplexity_interval(r, b, c.seed) if with_perplexity else {})))
        return out

    def rows(self, name: str, masks: Sequence[HeadMask], bias: str | None = None, axis: str | None = None,
             prompts: int | None = None, extra: dict | None = None,
             with_perplexity: bool = True) -> tuple[Evaluator, dict[HeadMask, StoredEvaluation]]:
        """The TEST-split evaluator of a measure and the stored evaluations of ``masks`` and the unrepaired model.

        Each is evaluated once (stored under ``test:{name}``) and read back from the store after.
        """
        c = self.run.cfg
        spec = self.run.spec("test", bias=bias, axis=axis, prompts=prompts or c.test_prompts,
                             ppl_tokens=c.test_ppl_tokens, extra=extra)
        ev, setting = self.run.evaluator(spec, with_perplexity)
        return ev, self.run.stored_rows(ev, setting, "test", labels.test(name), masks, with_perplexity, log_name=name)

    def paired_relative_difference(self, name: str, a: HeadMask, b: HeadMask) -> dict:
        """``(bias(a) - bias(b)) / bias(unrepaired)`` on the same TEST prompts, with its paired bootstrap.

        The difference of the two masks' relative bias changes (``a`` minus ``b``, in the
        units of the comparison tables). Every resample draws the same prompts for the
        unrepaired model and both masks, so the CI is of the difference itself, not of two
        point estimates. ``replicates`` keeps the resampled values, for pooling over seeds.
        """
        ev, rows = self.rows(name, [a, b])
        base = HeadMask.all_active(*self.run.shape)
        scores = [rows[m].prompt_scores for m in (base, a, b)]
        boot = ev.bias_measure.bootstrap_biases(scores)  # [3, reps], the same resamples for each row
        point = [rows[m].bias for m in (base, a, b)]
        reps = (boot[1] - boot[2]) / boot[0]
        return {"difference": (point[1] - point[2]) / point[0], "ci": percentile_ci(reps),
                "replicates": reps.tolist()}

    def checks(self, name: str, mask: HeadMask) -> dict[str, TestComparison]:
        """``mask`` vs the unrepaired model on each held-out benchmark of ``cfg.checks`` (TEST split).

        With the ``lms`` guard, StereoSet on the test items of every bias type too (the guard's
        statistic where the claims are made).
        """
        c = self.run.cfg
        out = {}
        for measure in split_list(c.checks):
            if measure not in (c.bias, "none"):
                out[measure] = self.compare(f"{name}/{measure}", [mask], bias=measure, with_perplexity=False)[0]
        if labels.LMS_GUARD in c.guards:  # the guard's own statistic, before and after, on test items
            out["stereoset (all types)"] = self.compare(f"{name}/stereoset/all", [mask], bias="stereoset", axis="all",
                                                        with_perplexity=False)[0]
        return out

    def report(self, chosen: HeadMask) -> TestReport:
        """Unrepaired vs ``chosen`` on the TEST split: search measure, toxicity second opinion, transfer axes.

        Timed as separate stages, so that a report says where the test's time went: ``test``
        (the search measure and perplexity), ``test_toxicity`` and ``test_transfer`` (when they
        are asked for) and ``test_checks`` (the held-out benchmarks).
        """
        c = self.run.cfg
        with self.run.timed("test"):
            self.run.log("measuring on the TEST split ...")
            report = TestReport(search_measure=self.compare(c.bias, [chosen])[0])
        if c.second_opinion != "none":
            with self.run.timed("test_toxicity"):
                report.toxicity = self.compare(
                    f"toxicity/{c.second_opinion}", [chosen], bias="toxicity", prompts=c.toxicity_prompts,
                    extra={"classifier": c.second_opinion}, with_perplexity=False)[0]
        if c.measured_axes:
            with self.run.timed("test_transfer"):
                for axis in c.measured_axes:
                    report.transfer[axis] = self.compare(f"{c.bias}/{axis}", [chosen], axis=axis,
                                                         with_perplexity=False)[0]
        with self.run.timed("test_checks"):
            report.checks = self.checks("check", chosen)
        return report


def _perplexity_interval(row: StoredEvaluation, base: StoredEvaluation, seed: int) -> dict:
    """The test perplexity change of ``row`` against ``base`` with its window-bootstrap interval."""
    a, b = row.perplexity_result, base.perplexity_result
    boot = window_bootstrap(a.per_window, b.per_window, a.tokens, seed=seed)
    return {"perplexity_change": row.perplexity / base.perplexity - 1, "perplexity_change_ci": boot["ci"],
            "perplexity_change_upper": boot["upper"]}


def _summary(row: StoredEvaluation, with_perplexity: bool) -> Summary:
    detail = row.bias_result
    extra = {k: detail.extra[k] for k in ("mean_toxicity", "share_toxic", "mean_score") if k in detail.extra}
    extra.update({k: v["value"] for k, v in detail.statistics.items()})
    for k, v in (detail.noise_corrected or {}).items():
        extra[f"noise_corrected_{k}"] = v
    return Summary(
        bias=row.bias, ci=list(row.bias_ci), n_pruned=row.mask.n_pruned, noise_floor=detail.noise_floor,
        buckets=detail.buckets,
        perplexity=row.perplexity if with_perplexity else None,
        perplexity_tokens=row.perplexity_result.tokens if with_perplexity else None, extra=extra)
