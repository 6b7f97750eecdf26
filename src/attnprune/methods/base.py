"""The method plug-in interface: what a pruning method may use, what it returns, and the registry.

A method proposes candidate masks and has them evaluated on the validation split through
its :class:`MethodContext` (which stores every evaluation); the shared
:class:`~attnprune.selection.SelectionPolicy` then chooses among them. The context is the
whole of what a method sees: the options, the policy, the pruned-count bounds, the seed,
evaluation and confirmation on validation data, shared single-head knockouts, the
validation measure's optional capabilities and a store-backed cache whose keys include
the options a value depends on. It never hands out the run, its store or its evaluators,
and this module does not import :mod:`attnprune.run`: any object with the methods of
:class:`Session` can stand behind a context. A method returns a :class:`Proposal` (its
evaluated candidates and the LLM evaluations it spent). Adding a method is one new module
with a class decorated by :func:`register_method`; import it in ``attnprune/methods/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from attnprune import labels
from attnprune.heads import HeadMask
from attnprune.registry import Registry
from attnprune.selection import Selection, SelectionPolicy
from attnprune.store import StoredEvaluation, fingerprint


class Session(Protocol):
    """What a :class:`MethodContext` needs from the run behind it (:class:`attnprune.run.Run` has it)."""

    cfg: Any
    shape: tuple[int, int]
    heads: np.ndarray  # bool (layers, heads): the cells of the mask grid that are heads
    n_total: int
    bounds: tuple[int, int]
    can_evaluate: bool
    cache_setting: str | None  # the store's key of the validation evaluator's setting
    cache_scope: str  # store and setting
    layout: Any

    def log(self, message: str) -> None: ...
    def timed(self, stage: str) -> AbstractContextManager: ...
    def evaluate(self, masks: Sequence[HeadMask], source: str, desc: str,
                 with_perplexity: bool = True) -> list[StoredEvaluation]: ...
    def rows(self, sources: Sequence[str] | None = None, with_perplexity: bool = True) -> list[StoredEvaluation]: ...
    def base(self) -> StoredEvaluation: ...
    def confirm(self, masks: Sequence[HeadMask], source: str): ...
    def meta_value(self, key: str): ...
    def set_meta_value(self, key: str, value) -> None: ...
    def measure_name(self) -> str: ...
    def estimates_removals(self) -> bool: ...
    def removal_estimates(self) -> dict: ...
    def perplexity_removal_estimates(self, tokens: int) -> np.ndarray: ...
    def guard_removal_estimates(self, axis: str) -> dict: ...
    def unrepaired_on_search_prompts(self, prompts: int) -> dict | None: ...
    def bucket_projection(self) -> np.ndarray | None: ...
    def gate_gradients(self) -> np.ndarray: ...


# FASP's pruning-ratio grid (and the ratios of the simple baselines)
ALPHAS = tuple(round(0.02 * i, 2) for i in range(1, 11))


@dataclass
class Knockouts:
    """Validation bias and perplexity of every single-head knockout, ``[L, H]`` each (NaN where no head is)."""

    bias: np.ndarray
    perplexity: np.ndarray
    rows: list[StoredEvaluation] = field(default_factory=list, repr=False)

    @property
    def evaluations(self) -> int:
        """LLM evaluations the knockouts took."""
        return len(self.rows)

    @property
    def seconds(self) -> float:
        """Seconds of real-model evaluation the knockouts took (as stored)."""
        return float(sum(r.seconds for r in self.rows))


def knockout_masks(shape: tuple[int, int], heads: np.ndarray | None = None) -> list[HeadMask]:
    """One mask per head (of the cells ``heads`` marks, default all) with only that head pruned, in (layer, head) order."""
    return [HeadMask.from_pruned(*shape, [(l, h)]) for l in range(shape[0]) for h in range(shape[1])
            if heads is None or heads[l, h]]


class MethodContext:
    """What a method may use (see module docstring): options, policy, bounds, seed, evaluations, knockouts, cache."""

    def __init__(self, session: Session, policy: SelectionPolicy, seed: int, evaluation_budget: int | None = None):
        self._session = session
        self.policy = policy
        self.seed = seed
        self.bounds = session.bounds
        self.evaluation_budget = evaluation_budget
        self._knockouts: Knockouts | None = None

    # ---- what the method works on -------------------------------------------------------
    @property
    def options(self):
        """The run's options (a :class:`~attnprune.config.RunConfig`; read them, never change them)."""
        return self._session.cfg

    @property
    def shape(self) -> tuple[int, int]:
        """``(layers, heads)``."""
        return self._session.shape

    @property
    def n_total(self) -> int:
        """Number of maskable heads."""
        return self._session.n_total

    @property
    def heads(self) -> np.ndarray:
        """Bool ``(layers, heads)``: the cells of the mask grid that are heads (all unless the layers differ)."""
        return self._session.heads

    @property
    def cells(self) -> int:
        """Length of a flat mask (``layers * heads`` of the grid): the annealer's and the surrogates' input."""
        return self.shape[0] * self.shape[1]

    @property
    def head_filter(self) -> np.ndarray | None:
        """Bool ``[cells]`` of the cells that are heads, or None when all are (what the annealer's ``free`` takes)."""
        heads = self.heads
        return None if heads.all() else heads.reshape(-1)

    @property
    def can_evaluate(self) -> bool:
        """Whether a model is loaded (``attnprune fit``/``search`` work from the store alone)."""
        return self._session.can_evaluate

    @property
    def scope(self) -> str:
        """Identity of the validation data (store and setting): equal scopes hold the same evaluations."""
        return self._session.cache_scope

    def log(self, message: str) -> None:
        """One line of progress."""
        self._session.log(message)

    def timed(self, stage: str) -> AbstractContextManager:
        """Add the block's wall-clock seconds to the run's timings of ``stage``."""
        return self._session.timed(stage)

    # ---- validation evaluations ---------------------------------------------------------
    def evaluate(self, masks: Sequence[HeadMask], source: str, desc: str,
                 with_perplexity: bool = True) -> list[StoredEvaluation]:
        """Evaluate ``masks`` on validation (stored under ``source``; each at most once per run).

        ``with_perplexity`` False measures the bias only: such rows (NaN perplexity) live
        apart, read back by ``rows(..., with_perplexity=False)``, never among the others.
        """
        return self._session.evaluate(masks, source, desc, with_perplexity=with_perplexity)

    def rows(self, sources: Sequence[str] | None = None, with_perplexity: bool = True) -> list[StoredEvaluation]:
        """The stored validation evaluations (of ``sources`` when given), in insertion order.

        ``with_perplexity`` False: the bias-only evaluations instead.
        """
        return self._session.rows(sources, with_perplexity=with_perplexity)

    def base(self) -> StoredEvaluation:
        """The unrepaired model's validation evaluation."""
        return self._session.base()

    def select(self, rows: Sequence[StoredEvaluation], source: str) -> Selection:
        """The policy's choice among ``rows`` against the unrepaired model, confirmed under ``source``."""
        return self.policy.select(list(rows), self.base(), self._session.confirm, source)

    # ---- the validation measure's optional capabilities ---------------------------------
    @property
    def measure_name(self) -> str:
        """The validation bias measure's name."""
        return self._session.measure_name()

    @property
    def estimates_removals(self) -> bool:
        """Whether the validation measure has first-order removal estimates (the likelihood measure has)."""
        return self._session.estimates_removals()

    def removal_estimates(self) -> dict:
        """First-order estimates of every head's removal: ``summary [N, B]``, ``log_perplexity [N]`` (one gradient pass)."""
        return self._session.removal_estimates()

    def perplexity_removal_estimates(self, tokens: int) -> np.ndarray:
        """``[N]`` first-order log-perplexity effect of every head's removal on ``tokens`` of the search half's text."""
        return self._session.perplexity_removal_estimates(tokens)

    def guard_removal_estimates(self, axis: str) -> dict:
        """``--guard-search``'s first-order estimates of guarded ``axis`` on the search half of its validation split.

        ``shifts [N, B]``, the unrepaired ``means`` and the ``weights`` of its buckets, its ``bias``,
        ``prompts`` and ``seconds`` (one forward and one gradient pass).
        """
        return self._session.guard_removal_estimates(axis)

    def unrepaired_on_search_prompts(self, prompts: int) -> dict | None:
        """The unrepaired model's bucket means on up to ``prompts`` search-half prompts, or None.

        A dict with ``buckets``, ``prompts``, ``bias`` and ``seconds``; None for a measure
        without bucket means. One evaluation without perplexity.
        """
        return self._session.unrepaired_on_search_prompts(prompts)

    def bucket_projection(self) -> np.ndarray | None:
        """The validation prompts' bucket-mean projection ``[B, n]`` (from the data alone), or None."""
        return self._session.bucket_projection()

    def gate_gradients(self) -> np.ndarray:
        """``[L, H]`` |d NLL / d gate| on the validation perplexity text."""
        return self._session.gate_gradients()

    @property
    def layout(self):
        """The loaded model's head layout (its weights, for weight-based methods)."""
        return self._session.layout

    # ---- a cache kept in the run's store ------------------------------------------------
    def _key(self, name: str, depends_on: Mapping | None) -> str:
        return f"{name}:{self._session.cache_setting}" + (f":{fingerprint(dict(depends_on))}" if depends_on else "")

    def cached(self, name: str, depends_on: Mapping | None = None):
        """The value kept under ``name`` for this validation data and the ``depends_on`` options, or None."""
        return self._session.meta_value(self._key(name, depends_on))

    def keep(self, name: str, value, depends_on: Mapping | None = None) -> None:
        """Keep ``value`` (JSON-ready) under ``name`` for this validation data and ``depends_on``; a rerun reads it back."""
        self._session.set_meta_value(self._key(name, depends_on), value)

    # ---- shared across methods ----------------------------------------------------------
    def default_budget(self) -> int:
        """Validation evaluations of AP's default design (screened knockouts, base, samples, rounds of candidates).

        The budget of the methods that match AP's cost when AP did not run first in the context.
        """
        c = self.options
        knockouts = c.screen_size(self.n_total) if c.sampler == "boundary" else 0
        return knockouts + 1 + c.samples + c.rounds * c.top_k

    def counts(self, ratios=ALPHAS) -> list[int]:
        """Pruned-head counts of a ratio grid, kept within the bounds."""
        k_min, k_max = self.bounds
        return sorted({min(k_max, max(k_min, max(1, int(r * self.n_total)))) for r in ratios})

    def lowest_masks(self, scores: np.ndarray) -> list[HeadMask]:
        """At each count of :meth:`counts`, the mask pruning the heads with the lowest ``scores`` ``[L, H]``.

        Only cells that are heads are pruned (:attr:`heads`), so a ranking method cannot pick one that is not.
        """
        return [prune_lowest(scores, k, allowed=self.heads) for k in self.counts()]

    @property
    def knockouts_done(self) -> bool:
        """Whether the knockouts were evaluated in this context."""
        return self._knockouts is not None

    def knockouts(self) -> Knockouts:
        """Every single-head knockout on validation (evaluated once per context, reused from the store)."""
        if self._knockouts is None:
            rows = self.evaluate(knockout_masks(self.shape, self.heads), labels.KNOCKOUT,
                                 "single-head knockouts (valid)")
            bias, perplexity = np.full(self.shape, np.nan), np.full(self.shape, np.nan)
            for r in rows:
                (cell,) = r.mask.pruned
                bias[cell], perplexity[cell] = r.bias, r.perplexity
            self._knockouts = Knockouts(bias, perplexity, rows)
        return self._knockouts


@dataclass
class Proposal:
    """A method's evaluated candidates and what it spent."""

    rows: list[StoredEvaluation]
    evaluations: int
    seconds: float
    notes: str = ""
    details: object | None = None  # method-specific, JSON-ready via to_dict() when it has one
    # keys of masks the method's own earlier selections confirmed over the perplexity budget (AP's calibration):
    # they stay evaluated and counted, but are not shortlisted again
    retired: frozenset[str] = frozenset()
    # what ``seconds`` counts besides ``rows``: stage -> (LLM evaluations, seconds), e.g. shared knockouts
    extras: dict[str, tuple[int, float]] = field(default_factory=dict)
    # the rows ``seconds`` counts, when not all of ``rows`` (a candidate that is also a counted knockout, once)
    charged: list[StoredEvaluation] | None = None
    # mask key -> the stage the method used it in (a mask another method evaluated first keeps that one's source)
    stage_of: dict[str, str] = field(default_factory=dict)
    # keys of masks the method's own earlier selections confirmed within the budget and below the unrepaired bias
    # (AP's calibration): the choice keeps them among its candidates, whether or not the last shortlist has them
    kept: frozenset[str] = frozenset()

    def stages(self) -> dict[str, dict]:
        """Where :attr:`evaluations` and :attr:`seconds` went: ``{stage: {"evaluations", "seconds"}}``.

        The charged rows grouped by their stage (:attr:`stage_of`, else
        :func:`attnprune.labels.stage` of the source that first evaluated them), then :attr:`extras`.
        """
        out: dict[str, dict] = {}
        for r in self.rows if self.charged is None else self.charged:
            stage = self.stage_of.get(r.mask.key) or labels.stage(r.source)
            s = out.setdefault(stage, {"evaluations": 0, "seconds": 0.0})
            s["evaluations"] += 1
            s["seconds"] += float(r.seconds)
        for name, (n, seconds) in self.extras.items():
            s = out.setdefault(name, {"evaluations": 0, "seconds": 0.0})
            s["evaluations"] += n
            s["seconds"] += float(seconds)
        return out

    def kept_rows(self) -> list[StoredEvaluation]:
        """The rows of the :attr:`kept` masks (confirmed admissible by a selection of the calibration)."""
        return [r for r in self.rows if r.mask.key in self.kept and r.mask.key not in self.retired]

    def selectable(self) -> list[StoredEvaluation]:
        """The rows the shared selection policy chooses among: :attr:`rows` less the :attr:`retired` masks."""
        return [r for r in self.rows if r.mask.key not in self.retired]


class Method(ABC):
    """A pruning method: proposes candidates, evaluated on validation through the context's run."""

    name: str = ""
    description: str = ""
    uses_knockouts: bool = False
    # a comparison gives the methods after this one (random_search, ap_paper, direct_sa) its validation
    # evaluation count as their budget
    sets_budget: bool = False

    @abstractmethod
    def propose(self, ctx: MethodContext) -> Proposal:
        """Evaluate this method's candidates (validation) and return them."""

    def proposal(self, ctx: MethodContext, masks: list[HeadMask], notes: str = "") -> Proposal:
        """Evaluate ``masks`` under the method's source label; count shared knockouts when used."""
        rows = ctx.evaluate(masks, labels.method(self.name), f"{self.name}: candidates (valid)")
        charged, extras = rows, {}
        if self.uses_knockouts:
            knock = ctx.knockouts()
            known = {r.mask.key for r in knock.rows}
            charged = [r for r in rows if r.mask.key not in known]  # a candidate that is a knockout is counted there
            extras["knockouts"] = (knock.evaluations, knock.seconds)
            notes = notes or "single-head knockouts shared with the other knockout methods, counted in each"
        evaluations, seconds = charged_totals(charged, extras)
        return Proposal(rows, evaluations, seconds, notes, extras=extras, charged=charged,
                        stage_of={r.mask.key: "candidates" for r in charged})


def charged_totals(rows: Sequence[StoredEvaluation], extras: Mapping[str, tuple[int, float]]) -> tuple[int, float]:
    """(LLM evaluations, seconds) a method is charged: ``rows`` once each, plus ``extras`` (stage -> (count, seconds))."""
    return (len(rows) + sum(n for n, _ in extras.values()),
            float(sum(r.seconds for r in rows)) + sum(seconds for _, seconds in extras.values()))


METHODS = Registry("method")
register_method = METHODS.register  # class decorator: make a method available by name


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return METHODS.names()


def get_method(name: str) -> Method:
    """A new instance of the registered method ``name``."""
    return METHODS[name]()


def prune_lowest(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> HeadMask:
    """Prune the ``k`` heads with the lowest ``scores`` ``[L, H]`` (among ``allowed`` heads: pass ``ctx.heads`` at least)."""
    flat = scores.reshape(-1).astype(float).copy()
    if allowed is not None:
        flat[~allowed.reshape(-1)] = np.inf
    order = np.argsort(flat, kind="stable")[:k]
    L, H = scores.shape
    return HeadMask.from_pruned(L, H, [divmod(int(i), H) for i in order if np.isfinite(flat[i])])
