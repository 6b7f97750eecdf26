"""The method plug-in interface: what a pruning method needs, what it returns, and the registry.

A method proposes candidate masks and has them evaluated on the validation split through
the run (:meth:`~attnprune.run.Run.evaluate`, which stores every evaluation); the shared
:class:`~attnprune.selection.SelectionPolicy` then chooses among them. A method sees a
:class:`MethodContext` (the run's public interface, the pruned-count bounds, the seed,
shared single-head knockouts) and returns a :class:`Proposal` (its evaluated candidates
and the LLM evaluations it spent). Adding a method is one new module with a class
decorated by :func:`register_method`; import it in ``attnprune/methods/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.run import Run
from attnprune.selection import SelectionPolicy
from attnprune.store import StoredEvaluation

# FASP's pruning-ratio grid (and the ratios of the simple baselines)
ALPHAS = tuple(round(0.02 * i, 2) for i in range(1, 11))


@dataclass
class Knockouts:
    """Validation bias and perplexity of every single-head knockout, ``[L, H]`` each."""

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


def knockout_masks(shape: tuple[int, int]) -> list[HeadMask]:
    """One mask per head with only that head pruned, in (layer, head) order."""
    return [HeadMask.from_pruned(*shape, [(l, h)]) for l in range(shape[0]) for h in range(shape[1])]


class MethodContext:
    """What a method may use: the run (public interface), the policy, bounds, seed, shared knockouts."""

    def __init__(self, run: Run, policy: SelectionPolicy, seed: int, evaluation_budget: int | None = None):
        self.run = run
        self.policy = policy
        self.seed = seed
        self.bounds = run.bounds
        self.evaluation_budget = evaluation_budget
        self._knockouts: Knockouts | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(layers, heads)``."""
        return self.run.shape

    def default_budget(self) -> int:
        """Validation evaluations of AP's default design (screened knockouts, base, samples, rounds of candidates).

        The budget of the methods that match AP's cost when AP did not run first in the context.
        """
        c = self.run.cfg
        knockouts = c.screen_size(self.run.n_total) if c.sampler == "boundary" else 0
        return knockouts + 1 + c.samples + c.rounds * c.top_k

    def counts(self, ratios=ALPHAS) -> list[int]:
        """Pruned-head counts of a ratio grid, kept within the bounds."""
        k_min, k_max = self.bounds
        return sorted({min(k_max, max(k_min, max(1, int(r * self.run.n_total)))) for r in ratios})

    @property
    def knockouts_done(self) -> bool:
        """Whether the knockouts were evaluated in this context."""
        return self._knockouts is not None

    def knockouts(self) -> Knockouts:
        """Every single-head knockout on validation (evaluated once per context, reused from the store)."""
        if self._knockouts is None:
            rows = self.run.evaluate(knockout_masks(self.shape), "knockout", "single-head knockouts (valid)")
            self._knockouts = Knockouts(np.array([r.bias for r in rows]).reshape(self.shape),
                                        np.array([r.perplexity for r in rows]).reshape(self.shape), rows)
        return self._knockouts


@dataclass
class Proposal:
    """A method's evaluated candidates and what it spent."""

    rows: list[StoredEvaluation]
    evaluations: int
    seconds: float
    notes: str = ""
    details: object | None = None  # method-specific, JSON-ready via to_dict() when it has one


class Method(ABC):
    """A pruning method: proposes candidates, evaluated on validation through the context's run."""

    name: str = ""
    description: str = ""
    uses_knockouts: bool = False

    @abstractmethod
    def propose(self, ctx: MethodContext) -> Proposal:
        """Evaluate this method's candidates (validation) and return them."""

    def proposal(self, ctx: MethodContext, masks: list[HeadMask], notes: str = "") -> Proposal:
        """Evaluate ``masks`` under the method's source label; count shared knockouts when used."""
        rows = ctx.run.evaluate(masks, f"method:{self.name}", f"{self.name}: candidates (valid)")
        evaluations, seconds = len(rows), float(sum(r.seconds for r in rows))
        if self.uses_knockouts:
            knock = ctx.knockouts()
            evaluations += knock.evaluations
            seconds += knock.seconds
            notes = notes or "single-head knockouts shared with the other knockout methods, counted in each"
        return Proposal(rows, evaluations, seconds, notes)


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a method available by ``name``."""

    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> Method:
    """A new instance of the registered method ``name``."""
    if name not in _METHODS:
        raise UserError(f"Unknown method '{name}'; choose from {', '.join(_METHODS)}.")
    return _METHODS[name]()


def prune_lowest(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> HeadMask:
    """Prune the ``k`` heads with the lowest ``scores`` ``[L, H]`` (among ``allowed`` heads)."""
    flat = scores.reshape(-1).astype(float).copy()
    if allowed is not None:
        flat[~allowed.reshape(-1)] = np.inf
    order = np.argsort(flat, kind="stable")[:k]
    L, H = scores.shape
    return HeadMask.from_pruned(L, H, [divmod(int(i), H) for i in order if np.isfinite(flat[i])])
