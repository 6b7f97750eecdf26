"""Typed results of a repair and a comparison, with ``to_dict()`` / ``from_dict()`` for JSON.

The report writers (:mod:`attnprune.report`, :mod:`attnprune.compare`) read these
dataclasses, never nested dicts through string paths. Each number says what it was
measured on through its ``setup`` (split, sizes, seeds).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from attnprune.errors import UserError


def to_dict(obj) -> dict:
    """JSON-ready dict of a results dataclass."""
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict):
    """Rebuild a results dataclass (nested ones included) from :func:`to_dict` output."""
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: _convert(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
    return cls(**kwargs)


def _convert(tp, value):
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is list and args:
        return [_convert(args[0], v) for v in value]
    if origin is dict and len(args) == 2:
        return {k: _convert(args[1], v) for k, v in value.items()}
    return value


def read_result(cls, file, missing: str, invalid: str):
    """``cls`` rebuilt from the JSON file ``file``; a missing file raises ``missing``, an unreadable one ``invalid``.

    Both messages are one sentence for the user; ``invalid`` may use ``{error}`` (the exception's class name).
    """
    file = Path(file)
    if not file.is_file():
        raise UserError(missing)
    try:
        return cls.from_dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(invalid.replace("{error}", type(exc).__name__)) from None  # not format: paths may hold braces


class Serialisable:
    """Mixin: :meth:`to_dict` and :meth:`from_dict`."""

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """Inverse of :meth:`to_dict`."""
        return from_dict(cls, data)


@dataclass
class EvaluatorSetup(Serialisable):
    """What every number of one evaluator is measured on: model, split, bias measure and both measures' inputs.

    ``bias_inputs`` / ``perplexity_inputs`` are each measure's own ``describe()`` (prompt
    counts, axis, seeds; corpus, windows, tokens): their keys belong to the measure.
    """

    model: str
    split: str
    bias_measure: str
    bias_inputs: dict
    perplexity_inputs: dict
    with_perplexity: bool | None = None

    @property
    def prompts(self) -> int | None:
        """Bias prompts (or items) measured."""
        return self.bias_inputs.get("prompts")


@dataclass
class BiasResult(Serialisable):
    """A bias measure's summary of one evaluation (``Evaluation.bias_detail`` / ``StoredEvaluation``, typed).

    ``buckets``/``bucket_weights``: the (template-adjusted) bucket means and their weights
    (HolisticBias measures); ``noise_floor``: the bias of the same scores with bucket labels
    shuffled; ``noise_corrected``: Lum et al.'s between-group SD less its sampling noise;
    ``statistics``: an item benchmark's own statistics (name -> value, CI); ``extra``: the
    measure's other keys (mean toxicity, share toxic, ...).
    """

    bias: float
    ci: list[float]
    buckets: dict[str, float] | None = None
    bucket_weights: dict[str, float] | None = None
    noise_floor: dict | None = None
    noise_corrected: dict | None = None
    statistics: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, detail: dict) -> "BiasResult":
        """From a measure's detail dict (the per-prompt scores are not part of it)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: detail[k] for k in known if k in detail and k != "statistics"},
                   statistics=detail.get("statistics") or {},
                   extra={k: v for k, v in detail.items() if k not in known and k != "per_prompt"})


@dataclass
class PerplexityResult(Serialisable):
    """The perplexity of one evaluation: value, mean token NLL, tokens scored and each window's NLL sum."""

    perplexity: float = float("nan")
    nll: float | None = None
    tokens: int | None = None
    per_window: list = field(default_factory=list)

    @classmethod
    def of(cls, detail: dict | None) -> "PerplexityResult | None":
        """From the perplexity measure's detail dict; None for an evaluation without perplexity."""
        if not detail or "tokens" not in detail:
            return None
        return cls(**{f.name: detail[f.name] for f in dataclasses.fields(cls) if f.name in detail})


@dataclass
class Change(Serialisable):
    """Repaired minus unrepaired bias on the same items: absolute, its paired 95% CI, relative.

    ``detectable``: the smallest absolute change this comparison detects with 80% power
    (:func:`attnprune.stats.detectable_change`); None in reports written before it was kept.
    """

    absolute: float
    ci: list[float]
    relative: float
    detectable: float | None = None


@dataclass
class Summary(Serialisable):
    """One mask on one test measure."""

    bias: float
    ci: list[float]
    n_pruned: int
    noise_floor: dict | None = None
    buckets: dict | None = None
    perplexity: float | None = None
    perplexity_tokens: int | None = None
    extra: dict = field(default_factory=dict)  # measure-specific (mean toxicity, share toxic, mean score)


@dataclass
class TestComparison(Serialisable):
    """A mask against the unrepaired model on the TEST split, paired on the same items."""

    __test__ = False  # not a pytest test class

    name: str
    setup: EvaluatorSetup
    card: dict
    unrepaired: Summary
    repaired: Summary
    bias_change: Change
    perplexity_change: float | None = None
    # bootstrap over the test text's windows: central 95% interval and one-sided 95% upper bound
    perplexity_change_ci: list[float] | None = None
    perplexity_change_upper: float | None = None
    # measure-specific statistics (pct_stereotype, SS, LMS, ICAT, ...): name -> {unrepaired, repaired, change, ci}
    statistics: dict[str, dict] = field(default_factory=dict)


@dataclass
class TestReport(Serialisable):
    """Everything measured on the TEST split for one chosen mask."""

    __test__ = False  # not a pytest test class

    search_measure: TestComparison
    toxicity: TestComparison | None = None
    transfer: dict[str, TestComparison] = field(default_factory=dict)
    checks: dict[str, TestComparison] = field(default_factory=dict)  # held-out benchmarks (CrowS-Pairs, StereoSet)


@dataclass
class Candidate(Serialisable):
    """A search candidate: predicted by the surrogates, then measured on the real model (validation)."""

    round: int
    n_pruned: int
    pruned: list[list[int]]
    predicted_bias: float
    predicted_perplexity: float
    bias: float
    perplexity: float


@dataclass
class AnnealingSummary(Serialisable):
    """One annealing run on the surrogates."""

    round: int
    pruned_bounds: list[int]
    t0: float
    states_scored: int
    seconds: float
    states_per_second: float
    best_cost: float
    trace: list[float] = field(default_factory=list)
    budget: float | None = None  # the perplexity budget (tau) this run annealed under


@dataclass
class Calibration(Serialisable):
    """One recalibration of AP's search after its confirmed candidates missed the budget.

    ``gap``: how much the search text's perplexity change under-stated the confirmed change;
    ``margin``: what the choice rule's one-sided bound adds (both means over ``confirmed``
    candidates, which pruned ``heads`` heads on average); ``gap_per_head``: the gap in
    log-perplexity per pruned head, which the search adds to its predicted perplexity;
    ``search_budget``: the budget searched again, ``tau`` less the margin (None: no room left);
    ``retired``: the masks it confirmed over the budget, which later selections do not shortlist.
    """

    gap: float
    margin: float
    search_budget: float | None
    confirmed: int
    gap_per_head: float = 0.0
    heads: float = 0.0
    retired: int = 0  # masks this selection confirmed over the budget, not shortlisted again


@dataclass
class TrimProbe(Serialisable):
    """One sub-mask of a trimmed candidate, measured on validation and (when it passed the screen) confirmed."""

    heads: int
    valid_bias: float
    valid_perplexity: float
    confirmed_perplexity_change: float | None = None  # None: the screen did not shortlist it (not confirmed)
    confirmed_perplexity_change_bound: float | None = None
    admissible: bool = False


@dataclass
class Trim(Serialisable):
    """AP's trim of a search candidate confirmed over the budget (``--trim``): its nested sub-masks, probed.

    ``heads``: the candidate's pruned count; ``confirmed_perplexity_change`` and ``..._bound``:
    its own confirmation; ``guess``: the first size probed, where the surrogate's perplexity
    along the path, scaled to the candidate's confirmed change, meets the budget less the
    bound's margin; ``probes``: every sub-mask measured (outward from the guess, then bisection);
    ``kept``: the largest admissible size (0: none).
    """

    heads: int
    valid_bias: float
    confirmed_perplexity_change: float
    confirmed_perplexity_change_bound: float
    guess: int
    probes: list[TrimProbe] = field(default_factory=list)
    kept: int = 0


@dataclass
class SearchDetails(Serialisable):
    """What Attention Pruning's search did: surrogate accuracy, annealing runs, validated candidates."""

    surrogates: list[dict] = field(default_factory=list)
    annealing: list[AnnealingSummary] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    calibration: list[Calibration] = field(default_factory=list)  # search budgets lowered after failed confirmations
    trim: list[Trim] = field(default_factory=list)  # over-budget candidates cut down to the budget (--trim)


@dataclass
class Measured(Serialisable):
    """Bias [95% CI] and perplexity of one mask on one evaluator's data."""

    bias: float
    perplexity: float
    ci: list[float] | None = None


def measured(row) -> Measured:
    """The :class:`Measured` numbers of a stored evaluation (anything with ``bias``, ``bias_ci``, ``perplexity``)."""
    return Measured(bias=row.bias, perplexity=row.perplexity, ci=list(row.bias_ci))


@dataclass
class ConfirmedValues(Serialisable):
    """A chosen mask on the confirmation data: bias [95% CI], perplexity, and its change over the unrepaired model's.

    ``perplexity_change_bound``: the one-sided upper bound of that change at the policy's confidence.
    """

    bias: float
    perplexity: float
    perplexity_change: float
    ci: list[float] | None = None
    perplexity_change_bound: float | None = None


@dataclass
class Choice(Serialisable):
    """A chosen mask's validation numbers (the search's data) and, when the rule confirms, its confirmation.

    ``mask`` / ``key`` are filled where the choice travels without its mask file (a front's points).
    """

    bias: float
    perplexity: float
    n_pruned: int
    source: str
    ci: list[float] | None = None
    confirmed: ConfirmedValues | None = None
    mask: dict | None = None
    key: str | None = None


@dataclass
class GuardVerdict(Serialisable):
    """One guard on one candidate (confirmation data): the unrepaired value, the change, its one-sided bounds, the limit.

    ``ok`` is the guard's test (``--guard-test``): ``within`` holds when ``upper`` is at most
    ``limit``, ``harm`` when ``lower`` is (``lower`` is None in records made before that option,
    all of them ``within``).
    """

    unrepaired: float
    change: float
    upper: float
    limit: float
    ok: bool
    lower: float | None = None
    test: str = "within"

    @property
    def tested(self) -> float:
        """The bound the guard's test reads: ``lower`` under ``harm``, ``upper`` under ``within``."""
        return self.lower if self.test == "harm" else self.upper


@dataclass
class ConfirmedCandidate(Serialisable):
    """A screened candidate re-measured on the confirmation data, and whether the rule admits it."""

    pruned: list[list[int]]
    source: str
    valid_bias: float
    valid_perplexity: float
    confirmed_bias: float | None  # None: not measured, since the perplexity bound missed the budget (not admissible)
    confirmed_perplexity_change: float
    confirmed_perplexity_change_bound: float
    admissible: bool
    # measured only for candidates that pass the budget and lower bias, in order of confirmed bias until one holds
    # every guard (None for the rest)
    guards: dict[str, GuardVerdict] | None = None


@dataclass
class ConfirmationSummary(Serialisable):
    """What the confirmation measured: its setup, the unrepaired model on its data, every confirmed candidate."""

    setup: EvaluatorSetup
    unrepaired: Measured
    candidates: list[ConfirmedCandidate] = field(default_factory=list)
    evaluation_seconds: float | None = None


@dataclass
class FrontTest(Serialisable):
    """A front point's mask against the unrepaired model on the TEST split (claims, never choices)."""

    __test__ = False  # not a pytest test class

    bias: float
    ci: list[float]
    bias_change: Change
    unrepaired_bias: float
    setup: EvaluatorSetup
    perplexity_change: float | None = None
    perplexity_change_ci: list[float] | None = None


@dataclass
class FrontPoint(Serialisable):
    """The repair's rule at one perplexity budget: its choice (None: no admissible mask) and what it cost."""

    budget: float
    new_confirmations: int
    seconds: float
    chosen: Choice | None = None


@dataclass
class Front(Serialisable):
    """A front of repaired models from one repair's store (``front.json``)."""

    model: str
    run: str
    search_budget: float
    rule: str
    confidence: float
    candidates: int
    confirmation: ConfirmationSummary
    guards: list[str] = field(default_factory=list)
    guard_margin: float = 0.0
    guard_test: str = "within"
    points: list[FrontPoint] = field(default_factory=list)
    test: dict[str, FrontTest] | None = None  # mask key -> its test numbers (``attnprune front --test``)
    seconds: dict[str, float] = field(default_factory=dict)

    def guard_words(self) -> str:
        """The guards and what they asked, in words ("none" without guards)."""
        if not self.guards:
            return "none"
        margin = f"{100 * self.guard_margin:g}% of its unrepaired value"
        asked = (f"none may be shown to rise by more than {margin}" if self.guard_test == "harm"
                 else f"each may rise by at most {margin}")
        return f"{', '.join(self.guards)} ({asked})"

    def point(self, budget: float) -> FrontPoint | None:
        """The point at ``budget`` (a fraction), if the front has it."""
        return next((p for p in self.points if abs(p.budget - budget) < 1e-9), None)


@dataclass
class ValidationPoint(Serialisable):
    """One evaluated mask on the validation split."""

    n_pruned: int
    bias: float
    perplexity: float
    source: str
    key: str


@dataclass
class ValidationSummary(Serialisable):
    """The search's split: setup, unrepaired, chosen, budget, every evaluated mask."""

    setup: EvaluatorSetup
    unrepaired: Measured
    chosen: Choice
    budget: float
    rule: str
    points: list[ValidationPoint] = field(default_factory=list)
    confirmation: ConfirmationSummary | None = None  # when the rule confirms


@dataclass
class EvaluationCounts(Serialisable):
    """A repair's real-model evaluations: on the search's validation data, on the confirmation data (the unrepaired
    model's included), new in this run, in the store, the seconds of the search's, confirmation's and guards', and
    the guard evaluations of the candidates (``--guard``; the unrepaired model's guard rows are not counted)."""

    validation: int
    confirmation: int
    new_this_run: int
    in_store: int
    evaluation_seconds: float
    guards: int = 0


@dataclass
class RepairReport(Serialisable):
    """The report of one repair (``report.json``)."""

    model: str
    layout: dict
    config: dict
    validation: ValidationSummary
    search: SearchDetails
    chosen_mask: dict
    test: TestReport
    llm_evaluations: EvaluationCounts
    timings_s: dict
    outputs: dict[str, Any] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)  # what the seconds were measured on (attnprune.machine)
    code: dict = field(default_factory=dict)  # the code that ran it (attnprune.machine.code_version)


@dataclass
class MethodOutcome(Serialisable):
    """One method on one seed: its choice on validation and that choice on the TEST split."""

    method: str
    seed: int
    llm_evaluations: int
    evaluation_seconds: float
    new_evaluations: int
    seconds: float
    candidates: int
    validation_evaluations: int = 0  # LLM evaluations on the search's validation data (confirmations not counted)
    notes: str = ""
    valid: Choice | None = None
    mask: dict | None = None
    test: TestComparison | None = None
    meets_budget: bool | None = None
    transfer: dict[str, TestComparison] = field(default_factory=dict)
    checks: dict[str, TestComparison] = field(default_factory=dict)
    confirmation: list[ConfirmedCandidate] = field(default_factory=list)
    # where llm_evaluations and evaluation_seconds went: {stage: {"evaluations", "seconds"}} (knockouts, samples,
    # candidates, confirmations, AP's first-order pass and anchor); empty in comparisons made before it was kept
    stages: dict[str, dict] = field(default_factory=dict)


@dataclass
class SeedValidation(Serialisable):
    """One seed's search data: its setup, the unrepaired model on it, and the perplexity budget (a limit)."""

    setup: EvaluatorSetup
    unrepaired: Measured
    budget: float


@dataclass
class SeedComparison(Serialisable):
    """All methods on one seed (its own split, sampling and search), one store, one budget."""

    seed: int
    validation: SeedValidation
    outcomes: dict[str, MethodOutcome] = field(default_factory=dict)
    knockouts: dict | None = None
    # AP minus each method on the same test prompts: difference of relative bias changes, paired CI, replicates
    ap_minus: dict[str, dict] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)  # what this seed's seconds were measured on (attnprune.machine)
    code: dict = field(default_factory=dict)  # the code that ran this seed (attnprune.machine.code_version)


@dataclass
class Comparison(Serialisable):
    """Methods x seeds (``comparison.json``)."""

    model: str
    config: dict
    methods: list[str]
    seeds: list[int]
    rule: str
    per_seed: list[SeedComparison] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    # ``attnprune pool``: the comparison directories this one was pooled from (empty for a run of its own)
    sources: list[str] = field(default_factory=list)
