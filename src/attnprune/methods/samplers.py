"""AP's samplers: the design (first real-model evaluations) the surrogates are fitted on, behind a registry.

A sampler (``--sampler``) decides which masks the design evaluates, under which store
labels, which heads the search may prune and which of a store's rows belong to its
design. Every sampler has the same methods (:class:`Sampler`); adding one is a class
decorated by :func:`register_sampler` in this module (or any module imported by
``attnprune/methods/__init__.py``).

- ``boundary`` (default): every single-head knockout of a screened share of the heads
  (cheap with layer reuse; shared with FASP), then random masks whose knockout-predicted
  perplexity lies near the budget, where the choice will be made.
- ``paper``: the paper's random masks with a pruning ratio r ~ U(r_min, r_max).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from attnprune import labels
from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.methods.base import MethodContext, knockout_masks
from attnprune.registry import Registry
from attnprune.store import StoredEvaluation
from attnprune.surrogate import on_line

Label = Callable[[str], str]  # a method's store label of one of its stages (AP variants carry a prefix)


class Sampler:
    """The design of one AP run (see module docstring); ``options`` are AP's (with a variant's overrides)."""

    name = ""

    def __init__(self, options):
        self.options = options

    def design(self, ctx: MethodContext, label: Label) -> list[StoredEvaluation]:
        """Evaluate the design on validation (stored as it completes) and return its rows."""
        raise NotImplementedError

    def sources(self, label: Label) -> list[str]:
        """The store labels of the design's evaluations."""
        return [label(labels.SAMPLE)]

    def free(self, ctx: MethodContext) -> np.ndarray | None:
        """The heads the search may prune (bool ``[L*H]``), or None for all."""
        return ctx.head_filter

    def training_rows(self, ctx: MethodContext, rows: list[StoredEvaluation]) -> list[StoredEvaluation]:
        """The rows of ``rows`` that belong to this design (a store may hold other methods' knockouts)."""
        return rows

    def bias_only_rows(self, ctx: MethodContext) -> list[StoredEvaluation]:
        """The design's evaluations of the bias alone (NaN perplexity; kept apart from the others)."""
        return []

    def describe(self, ctx: MethodContext, rows: list[StoredEvaluation]) -> str:
        """What the design evaluated, for the method's notes (after the evaluation count)."""
        return ""


SAMPLERS = Registry("sampler")
register_sampler = SAMPLERS.register  # class decorator: make a sampler available as ``--sampler name``


def sampler_names() -> list[str]:
    """Registered sampler names, in registration order."""
    return SAMPLERS.names()


def make_sampler(name: str, options) -> Sampler:
    """The sampler ``name`` on ``options``."""
    return SAMPLERS[name](options)


@register_sampler("boundary")
class BoundarySampler(Sampler):
    """Screened single-head knockouts, then samples near the budget (see module docstring)."""

    def __init__(self, options):
        super().__init__(options)
        self._screens: dict[str, np.ndarray] = {}  # scope -> free heads
        self._measured: dict[str, np.ndarray] = {}  # scope -> knocked-out heads whose perplexity is measured

    def design(self, ctx: MethodContext, label: Label) -> list[StoredEvaluation]:
        c = self.options
        base = ctx.base()
        free, measured = self.free(ctx), self.perplexity_measured(ctx)
        masks = [m for m in knockout_masks(ctx.shape, ctx.heads) if free[head_index(m, ctx.shape)]]
        light = [m for m in masks if not measured[head_index(m, ctx.shape)]]  # knocked out for the bias alone
        knock = ctx.evaluate([m for m in masks if m not in light], labels.KNOCKOUT, "single-head knockouts (valid)")
        if light:
            ctx.evaluate(light, labels.KNOCKOUT_BIAS, "single-head knockouts, bias only (valid)", with_perplexity=False)
        effect = np.zeros(ctx.cells)
        for r in knock:
            effect[head_index(r.mask, ctx.shape)] = math.log(r.perplexity) - math.log(base.perplexity)
        if light:  # their first-order estimates on the line of the measured ones
            est = np.asarray(first_order(ctx)["log_perplexity"], dtype=float)
            effect[free & ~measured] = on_line(est, effect, measured)[free & ~measured]
        masks = boundary_masks(c.samples, ctx.shape, effect, c.tau, ctx.bounds, c.seed, free=free)
        return [base, *knock, *ctx.evaluate(masks, label(labels.SAMPLE), "samples near the budget (valid)")]

    def perplexity_measured(self, ctx: MethodContext) -> np.ndarray:
        """The knocked-out heads whose knockout measures perplexity too (bool ``[L*H]``): all, or ``--knockout-ppl``'s share.

        The share is spread evenly over the ranks of the heads' first-order perplexity
        estimates (cheapest and dearest included), so that the line from the estimates to the
        knockout effects, on which the other heads' effects are read, spans them all.
        """
        if ctx.scope not in self._measured:
            free = self.free(ctx)
            screened = np.flatnonzero(free)
            k = self.options.ppl_knockouts(len(screened))
            if k >= len(screened):
                self._measured[ctx.scope] = free.copy()
            else:
                first = first_order(ctx)
                if first is None:
                    raise UserError(f"--knockout-ppl below 1 spreads the knockouts it measures over first-order "
                                    f"perplexity estimates, which {ctx.measure_name} has not; use --knockout-ppl 1.")
                est = np.asarray(first["log_perplexity"], dtype=float)[screened]
                ranked = screened[np.argsort(est, kind="stable")]
                measured = np.zeros(ctx.cells, dtype=bool)
                measured[ranked[np.unique(np.linspace(0, len(ranked) - 1, k).round().astype(int))]] = True
                self._measured[ctx.scope] = measured
        return self._measured[ctx.scope]

    def sources(self, label: Label) -> list[str]:
        return [label(labels.SAMPLE), labels.KNOCKOUT]

    def free(self, ctx: MethodContext) -> np.ndarray:
        """The heads to knock out (bool ``[L*H]``): all, or the most promising share by first-order estimates.

        Half of them lower the bias most per unit of (estimated) perplexity, the rest lower it
        most in absolute terms. The estimates (one gradient pass) are kept in the store, so a
        rerun screens the same heads.
        """
        if ctx.scope not in self._screens:
            self._screens[ctx.scope] = self._screen(ctx)
        return self._screens[ctx.scope]

    def _screen(self, ctx: MethodContext) -> np.ndarray:
        n = ctx.n_total
        heads = ctx.heads.reshape(-1)
        k = self.options.screen_size(n)
        if k >= n:
            return heads.copy()
        est = first_order(ctx)
        if est is None:
            ctx.log(f"{ctx.measure_name} has no first-order removal estimates to screen with: "
                    f"knocking out every head ({n} evaluations; --knockouts 1 asks for that directly)")
            return heads.copy()
        summary, log_ppl = np.asarray(est["summary"]), np.asarray(est["log_perplexity"])
        base_summary, _, statistic = summaries_of(ctx, [ctx.base()])
        b0 = base_summary[0]
        with torch.no_grad():
            change = (statistic(torch.as_tensor(b0 + summary, dtype=torch.float32))
                      - statistic(torch.as_tensor(b0, dtype=torch.float32)[None])).numpy()
        ratio = np.where(change < 0, change / np.maximum(log_ppl, 1e-4), 0.0)
        ratio[~heads], change[~heads] = np.inf, np.inf  # cells that are no heads rank last
        keep: list[int] = []
        for order in (np.argsort(ratio, kind="stable")[: k // 2], np.argsort(change, kind="stable")):
            for h in order:
                if len(keep) >= k:
                    break
                if int(h) not in keep:
                    keep.append(int(h))
        free = np.zeros(ctx.cells, dtype=bool)
        free[keep] = True
        return free

    def training_rows(self, ctx: MethodContext, rows: list[StoredEvaluation]) -> list[StoredEvaluation]:
        if self.options.knockouts >= 1 and self.options.knockout_ppl >= 1:
            return rows
        # a store may hold more knockouts with perplexity (FASP's), which this design did not pay for
        measured = self.perplexity_measured(ctx)
        return [r for r in rows if r.source != labels.KNOCKOUT or measured[head_index(r.mask, ctx.shape)]]

    def bias_only_rows(self, ctx: MethodContext) -> list[StoredEvaluation]:
        if self.options.knockout_ppl >= 1:
            return []
        free, measured = self.free(ctx), self.perplexity_measured(ctx)
        return [r for r in ctx.rows([labels.KNOCKOUT_BIAS], with_perplexity=False)
                if free[i := head_index(r.mask, ctx.shape)] and not measured[i]]

    def describe(self, ctx: MethodContext, rows: list[StoredEvaluation]) -> str:
        with_ppl = sum(r.source == labels.KNOCKOUT for r in rows)
        knocked = with_ppl + len(self.bias_only_rows(ctx))
        screened = knocked < ctx.n_total and ctx.cached("first_order") is not None
        light = f" ({knocked - with_ppl} of them measuring the bias only)" if knocked > with_ppl else ""
        return (f"{knocked} single-head knockouts{' chosen by one first-order gradient pass' if screened else ''}"
                f"{light}, ")


@register_sampler("paper")
class PaperSampler(Sampler):
    """The paper's U(r_min, r_max) random masks (see module docstring)."""

    def design(self, ctx: MethodContext, label: Label) -> list[StoredEvaluation]:
        c = self.options
        ctx.base()
        masks = random_masks(c.samples, ctx.shape, c.r_min, c.r_max, c.seed, ctx.heads)
        wanted = {m.key for m in masks}
        done = sum(1 for r in ctx.rows() if r.mask.key in wanted)
        if done > 1:
            ctx.log(f"{done} of {len(masks)} sample masks already evaluated, continuing")
        return ctx.evaluate(masks, label(labels.SAMPLE), "sampling (valid)")


def first_order(ctx: MethodContext) -> dict | None:
    """First-order removal estimates of every head on validation (computed once per store and setting).

    None when the bias measure has none (only the likelihood measure is differentiable here).
    """
    stored = ctx.cached("first_order")
    if stored is None:
        if not ctx.estimates_removals:
            return None
        ctx.log("first-order estimates of every head's removal (one gradient pass, validation) ...")
        with ctx.timed("first_order"):
            t = time.perf_counter()
            est = ctx.removal_estimates()
            stored = {"summary": est["summary"].tolist(), "log_perplexity": est["log_perplexity"].tolist(),
                      "seconds": time.perf_counter() - t}
        ctx.keep("first_order", stored)
    return stored


def random_masks(n: int, shape: tuple[int, int], r_min: float, r_max: float, seed: int,
                 heads: np.ndarray | None = None) -> list[HeadMask]:
    """The all-active mask, then ``n`` random masks; a larger ``n`` extends the same sequence.

    ``heads`` (bool ``shape``, default all) marks the cells that are heads; only they are pruned.
    """
    cells = np.flatnonzero(np.ones(shape, dtype=bool) if heads is None else heads)
    total = len(cells)
    k_lo, k_hi = max(1, int(math.floor(r_min * total))), max(1, int(math.floor(r_max * total)))
    space = sum(math.comb(total, k) for k in range(k_lo, k_hi + 1))
    if n > space:
        raise UserError(
            f"Only {space} distinct masks prune {k_lo}-{k_hi} of {total} heads; lower --samples to at most {space} "
            "or widen --r-min/--r-max."
        )
    rng = np.random.default_rng(seed)
    masks = [HeadMask.all_active(*shape)]
    seen = {masks[0].key}
    while len(masks) < n + 1:
        k = max(1, int(math.floor(rng.uniform(r_min, r_max) * total)))
        pruned = cells[rng.choice(total, size=k, replace=False)]
        m = HeadMask.from_pruned(*shape, [divmod(int(i), shape[1]) for i in pruned])
        if m.key not in seen:
            seen.add(m.key)
            masks.append(m)
    return masks


def boundary_masks(n: int, shape: tuple[int, int], log_ppl_effect: np.ndarray, tau: float, bounds: tuple[int, int],
                   seed: int, free: np.ndarray | None = None, target: float = 0.8, draws: int = 20_000) -> list[HeadMask]:
    """``n`` distinct random masks whose additive perplexity change lies closest to ``target x tau``.

    Heads are drawn with probability decreasing in their knockout cost (cheap heads are what
    a mask within the budget is made of), the pruned count uniformly in ``bounds`` (at most
    24 heads); of ``draws`` such masks, those whose summed knockout log-perplexity effects
    predict a change nearest the target are kept. Only ``free`` heads (default all) are drawn.
    """
    rng = np.random.default_rng(seed)
    effect = np.nan_to_num(np.asarray(log_ppl_effect, dtype=float).reshape(-1), nan=0.0)
    free = np.ones(effect.size, dtype=bool) if free is None else np.asarray(free, dtype=bool)
    scale = float(np.median(np.abs(effect[free]))) or 1e-3
    p = np.exp(-np.clip(effect, 0, None) / scale) * free
    p /= p.sum()
    k_lo = max(2, bounds[0])
    k_hi = max(k_lo, min(bounds[1], 24, int(free.sum())))
    pool: dict[str, tuple[float, HeadMask]] = {}
    for _ in range(draws):
        k = int(rng.integers(k_lo, k_hi + 1))
        heads = rng.choice(effect.size, size=k, replace=False, p=p)
        m = HeadMask.from_pruned(*shape, [divmod(int(h), shape[1]) for h in heads])
        pool.setdefault(m.key, (abs(math.expm1(effect[heads].sum()) - target * tau), m))
    return [m for _, m in sorted(pool.values(), key=lambda x: (x[0], x[1].key))[:n]]


def head_index(mask: HeadMask, shape: tuple[int, int]) -> int:
    """The flat index of a single-head knockout's pruned head."""
    layer, head = mask.pruned[0]
    return layer * shape[1] + head


def bucket_spread(means: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The HolisticBias statistic of bucket means ``[..., B]``: their absolute deviations from the weighted mean, summed."""
    return ((means @ weights).unsqueeze(-1) - means).abs().sum(-1)


def summaries_of(ctx: MethodContext, rows: list[StoredEvaluation]):
    """Per row: the bias measure's summary (bucket means), its sampling variance vs the unrepaired model, and the statistic.

    For HolisticBias measures the summary is the template-adjusted bucket means and the
    statistic the spread around their weighted mean; other measures fall back to the bias
    itself (a scalar summary, no variance).
    """
    first = rows[0].bias_result
    if first.buckets and first.bucket_weights:
        names = sorted(first.buckets)
        w = torch.tensor([first.bucket_weights[b] for b in names], dtype=torch.float32)
        summaries = np.array([[r.bias_result.buckets[b] for b in names] for r in rows])
        projection = ctx.bucket_projection()
        base = next(r for r in rows if r.mask.n_pruned == 0)
        b0 = base.prompt_scores
        var = None
        if projection is not None:
            diffs = np.array([r.prompt_scores - b0 for r in rows])
            var = (diffs - diffs.mean(1, keepdims=True)) ** 2 @ (projection ** 2).T

        return summaries, var, lambda means: bucket_spread(means, w)
    return np.array([[r.bias] for r in rows]), None, lambda means: means[..., 0]
