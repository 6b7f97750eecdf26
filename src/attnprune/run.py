"""An open run: its model, its store, the evaluators made for it, and where they run.

:class:`Run` is what every method and pipeline works through: ``evaluate(masks, source)``
puts validation evaluations into the run's store (each committed as it arrives, so an
interrupted run loses nothing and a rerun skips what is there), ``rows``/``base`` read
them back, and ``Run.bench`` (:class:`attnprune.bench.TestBench`) measures chosen masks
against the unrepaired model on the TEST split. All evaluators come from one factory
(:meth:`Run.spec`), so the validation and the test evaluators differ only in the split and
the sizes. A run is a context manager: hooks, workers and the store are released on exit,
also when a stage raises.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from attnprune import labels
from attnprune.bench import TestBench
from attnprune.config import RunConfig
from attnprune.errors import UserError
from attnprune.evaluation import Evaluation, Evaluator
from attnprune.executors import EvaluatorSpec, Executor, make_executor
from attnprune.heads import HeadMask
from attnprune.models.layouts import head_cells
from attnprune.results import GuardVerdict
from attnprune.selection import NeedsBias, Selection
from attnprune.store import Store, StoredEvaluation

Log = Callable[[str], None]
logger = logging.getLogger("attnprune")

# bootstrap replicates of the CI of each validation evaluation: recorded, never used for a
# decision; the test split uses the measures' default of 1,000
VALID_BOOTSTRAP_REPS = 200


def progress(iterable=None, **kwargs) -> tqdm:
    """A progress bar over masks: live on a terminal; in a log file a line a minute, not one per mask."""
    live = sys.stderr.isatty()
    every = 0.1 if live else 60.0  # tqdm's monitor thread refreshes after maxinterval: keep it at the same pace
    return tqdm(iterable, unit="mask", dynamic_ncols=live, mininterval=every, maxinterval=max(every, 10.0), **kwargs)


def with_perplexity_of(evaluation: Evaluation, first: StoredEvaluation) -> Evaluation:
    """A bias-only ``evaluation`` completed with the perplexity of the same mask's perplexity-only ``first``."""
    return dataclasses.replace(evaluation, perplexity=first.perplexity,
                               perplexity_detail=first.perplexity_result.to_dict(),
                               seconds=evaluation.seconds + first.seconds)


class Run:
    """An open run (see module docstring); use as ``with Run.open(cfg) as run: ...``."""

    def __init__(self, cfg: RunConfig, loaded, store: Store, log: Log = logger.info):
        self.cfg = cfg
        self.loaded = loaded
        self.store = store
        self.log = log
        self.timings: dict[str, float] = {}
        self._open_stages: list[float] = []  # per open timed() block: seconds spent in stages nested inside it
        self.valid_setting: str | None = None
        self._valid: Evaluator | None = None
        self._executor: Executor | None = None
        self._evaluators: dict[str, tuple[Evaluator, str]] = {}
        self._derived: dict[str, object] = {}  # computed once per run (bucket_projection, heads, warned guards)
        self.bench = TestBench(self)  # the TEST split: chosen masks against the unrepaired model

    @classmethod
    def open(cls, cfg: RunConfig, loaded=None, log: Log = logger.info) -> "Run":
        """Load the model (unless given) and open or create the run's store."""
        cfg.validate()
        t = time.perf_counter()
        if loaded is None:
            log(f"loading {cfg.model} ...")
            loaded = cfg.load()
        protected = int(cfg.protected_cells(loaded.layout.row_heads, loaded.layout.shape[1]).sum())
        cfg.check_model(loaded.layout.n_total - protected, protected)
        config = cfg.store_config(loaded.name)
        store = Store(cfg.out_dir / "store.sqlite", loaded.layout.shape, config,
                      compatible_keys=[k for k in config if k != "samples"], row_heads=loaded.layout.row_heads)
        _extend_design(store, cfg.samples)
        run = cls(cfg, loaded, store, log)
        run.timings["load"] = time.perf_counter() - t
        return run

    @classmethod
    def from_store(cls, cfg: RunConfig, log: Log = logger.info) -> "Run":
        """Open an existing run's store without loading the model (fit and search need only the store)."""
        store = Store(cfg.out_dir / "store.sqlite", None)
        # fit and search only read: the measurement keys must match, decision options may differ
        store.check_config(cfg.store_config(store.config.get("model", cfg.model)), keys=cfg.STORE_KEYS)
        run = cls(cfg, None, store, log)
        run.valid_setting = store.setting_of(labels.SAMPLE)
        if run.valid_setting is None:
            store.close()
            raise UserError(f"Store {store.path} holds no sampled masks yet; run `attnprune sample` first.")
        return run

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- what the run is about ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(layers, heads)`` of the run's model."""
        return tuple(self.store.shape)  # type: ignore[return-value]

    @property
    def heads(self) -> np.ndarray:
        """Bool ``(layers, heads)``: the cells of the mask grid that the methods may prune.

        The cells that are heads (all of them unless layers differ), less those ``--protect`` keeps.
        """
        if "heads" not in self._derived:
            heads = head_cells(self.store.row_heads, self.shape[1])
            self._derived["heads"] = heads & ~self.cfg.protected_cells(self.store.row_heads, self.shape[1])
        return self._derived["heads"].copy()

    @property
    def n_total(self) -> int:
        """Number of heads the methods may prune (the model's, less ``--protect``'s)."""
        return int(self.heads.sum())

    @property
    def bounds(self) -> tuple[int, int]:
        """``[k_min, k_max]`` pruned heads for sampling and the search."""
        return self.cfg.bounds(self.n_total)

    @property
    def model_name(self) -> str:
        """The model's name as the store records it."""
        return self.loaded.name if self.loaded is not None else self.store.config.get("model", self.cfg.model)

    @property
    def layout(self):
        """The loaded model's head layout."""
        return self.loaded.layout

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the block's wall-clock seconds to ``timings[stage]``, less those of stages timed inside it.

        Stages nest (the anchor is computed while the surrogates are fitted, the first-order
        pass while the design is sampled), and each second counts in one stage only, so the
        stages add up to the run's time.
        """
        t = time.perf_counter()
        self._open_stages.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t
            inner = self._open_stages.pop()
            self.timings[stage] = self.timings.get(stage, 0.0) + elapsed - inner
            if self._open_stages:
                self._open_stages[-1] += elapsed

    # ---- the one evaluator factory -------------------------------------------------------
    def spec(self, split: str = "valid", bias: str | None = None, axis: str | None = None, prompts: int | None = None,
             ppl_tokens: int | None = None, bootstrap_reps: int | None = None, part: str | None = None,
             extra: dict | None = None) -> EvaluatorSpec:
        """The recipe of an evaluator of this run (defaults: the search's measure, axis and sizes).

        ``part`` (``search`` / ``confirm``) takes one of the two disjoint halves of the prompts
        and of the text; ``extra`` holds the bias measure's own options (a classifier).
        """
        from attnprune.measures import accepted_options

        c = self.cfg
        bias = bias or c.bias
        bias_options = {"axis": axis or c.axis, "prompts": prompts or c.prompts, "seed": c.seed,
                        "holisticbias": c.holisticbias, **({"part": part} if part else {}), **(extra or {})}
        if bootstrap_reps is not None:
            bias_options["bootstrap_reps"] = bootstrap_reps
        return EvaluatorSpec(
            model=c.model, bias=bias, bias_options=accepted_options(bias, bias_options), split=split, device=c.device,
            dtype=c.dtype, device_map=c.device_map, cache_dir=c.cache_dir,
            perplexity_options={"max_tokens": ppl_tokens or c.ppl_tokens, "source": c.corpus, "seed": c.seed,
                                **({"part": part} if part else {})},
            backend_options=c.backend_options,
        )

    @property
    def valid_spec(self) -> EvaluatorSpec:
        """The recipe of the search's validation evaluator (what Ray workers build too).

        With confirmation on, its prompts come from the validation split's search half, so
        the confirmation half stays unseen by the search.
        """
        return self.spec("valid", bootstrap_reps=VALID_BOOTSTRAP_REPS, part="search" if self.cfg.confirm > 0 else None)

    @property
    def confirm_spec(self) -> EvaluatorSpec:
        """The recipe of the confirmation evaluator: the validation split's other half, more validation text."""
        c = self.cfg
        return self.spec("valid", prompts=c.confirm_prompts, ppl_tokens=c.confirm_ppl_tokens,
                         bootstrap_reps=VALID_BOOTSTRAP_REPS, part="confirm")

    def evaluator(self, spec: EvaluatorSpec, with_perplexity: bool = True) -> tuple[Evaluator, str]:
        """The evaluator of ``spec`` on the run's model (built once) and its setting key in the store."""
        key = json.dumps([dataclasses.asdict(spec), with_perplexity], sort_keys=True, default=str)
        if key not in self._evaluators:
            ev = spec.build(self.loaded)
            desc = ev.describe() if spec == self.valid_spec else {**ev.describe(), "with_perplexity": with_perplexity}
            self._evaluators[key] = (ev, self.store.register_setting(desc))
        return self._evaluators[key]

    @property
    def valid(self) -> Evaluator:
        """The validation-split evaluator used by sampling and candidate validation."""
        if self._valid is None:
            self._valid, self.valid_setting = self.evaluator(self.valid_spec)
        return self._valid

    @property
    def executor(self) -> Executor:
        """Where validation evaluations run (``cfg.executor``), started on first use."""
        if self._executor is None:
            c = self.cfg
            if c.executor == "ray":
                self.log(f"starting {c.workers} Ray workers ({c.worker_cpus:g} CPUs, {c.worker_gpus:g} GPUs each"
                         f"{', cluster ' + c.address if c.address else ', local'}) ...")
            self._executor = make_executor(c.executor, self.valid_spec, self.valid, c.mask_batch, c.workers,
                                           c.worker_cpus, c.worker_gpus, c.address)
        return self._executor

    # ---- validation evaluations in the store ---------------------------------------------
    def evaluate(self, masks: Sequence[HeadMask], source: str, desc: str,
                 with_perplexity: bool = True) -> list[StoredEvaluation]:
        """Evaluate (validation split) the masks not yet stored, committing each as it arrives; return all.

        ``with_perplexity`` False measures the search's bias only, stored under the validation
        evaluator's bias-only setting (:attr:`bias_only_setting`; its rows read NaN perplexity).
        """
        _ = self.valid
        setting = self.valid_setting if with_perplexity else self.bias_only_setting
        todo = [m for m in dict.fromkeys(masks) if self.store.get(m, setting) is None]
        if todo:
            with progress(total=len(todo), desc=desc) as bar:
                def commit(ev) -> None:
                    self.store.add(setting, "valid", source, ev)
                    bar.update(1)

                self.executor.evaluate(todo, commit, with_perplexity=with_perplexity)
        self.store.label(setting, source, masks)
        return [self.store.get(m, setting) for m in masks]

    @property
    def bias_only_setting(self) -> str | None:
        """The store setting of validation evaluations of the search's bias without perplexity (AP's light knockouts).

        A run opened from its store alone finds it by the label of those knockouts (None when there are none).
        """
        if self.loaded is None:
            return self.store.setting_of(labels.KNOCKOUT_BIAS)
        return self.store.register_setting({**self.valid.describe(), "with_perplexity": False})

    def confirm(self, masks: Sequence[HeadMask], source: str, needs_bias: NeedsBias | None = None,
                ) -> tuple[list[StoredEvaluation], StoredEvaluation]:
        """``masks`` and the unrepaired model on the confirmation data (stored; evaluated once each).

        With ``needs_bias`` (a mask's perplexity-only confirmation and the unrepaired model's ->
        whether the choice could take it), perplexity comes first and the bias is measured only
        where ``needs_bias`` says so: a mask over the budget comes back with NaN bias, stored
        under its own setting, and a later call that needs its bias (a larger budget) measures
        only the bias. Without, both are measured at once.
        """
        ev, setting = self.evaluator(self.confirm_spec)
        ppl_setting = self.perplexity_only_setting(ev)
        base = HeadMask.all_active(*self.shape)
        with self.timed("confirm"):
            if self.store.get(base, setting) is None:
                self.log("confirming the unrepaired model (fresh validation data) ...")
                self.store.add(setting, "confirm", labels.CONFIRM_UNREPAIRED, ev.evaluate([base])[0])
            base_row = self.store.get(base, setting)
            todo = {}  # mask -> its perplexity-only confirmation (None: not yet measured), where something is left
            for m in dict.fromkeys(masks):
                if m == base or self.store.get(m, setting) is not None:
                    continue
                first = self.store.get(m, ppl_setting) if needs_bias is not None else None
                if first is None or needs_bias(first, base_row):
                    todo[m] = first
            for m, first in progress(list(todo.items()), desc="confirming (fresh validation data)", disable=not todo):
                if needs_bias is None:
                    self.store.add(setting, "confirm", source, ev.evaluate([m])[0])
                    continue
                if first is None:
                    self.store.add(ppl_setting, "confirm", source, ev.evaluate([m], with_bias=False)[0])
                    first = self.store.get(m, ppl_setting)
                if needs_bias(first, base_row):
                    self.store.add(setting, "confirm", source, with_perplexity_of(
                        ev.evaluate([m], with_perplexity=False)[0], first))
        return [self.store.get(m, setting) or self.store.get(m, ppl_setting) for m in masks], base_row

    def evaluated(self) -> set[tuple[str, str]]:
        """(setting, mask key) of every stored evaluation, a mask's perplexity-only confirmation left out once its
        full one is there: what is new in it counts the evaluations made since (a confirmation measured at once
        counts one, a bias measured later for a perplexity-only confirmation one more)."""
        ev, setting = self.evaluator(self.confirm_spec)
        ppl, full = self.perplexity_only_setting(ev), self.store.keys(setting)
        return {(s, k) for s, k in self.store.pairs() if not (s == ppl and k in full)}

    def perplexity_only_setting(self, ev: Evaluator) -> str:
        """The store setting of confirmations measured for perplexity only (``ev``: the confirmation evaluator)."""
        return self.store.register_setting({**ev.describe(), "with_perplexity": True, "with_bias": False})

    def guard_spec(self, axis: str, part: str | None = None) -> EvaluatorSpec:
        """The recipe of a guard: the search's measure on ``axis``, on that axis's validation prompts.

        A guarded axis is never the search's (``--guard`` refuses it), so neither the search
        nor a confirmation reads its prompts: both halves of its validation split are fresh to
        the choice, and the guard takes from all of it (up to ``--guard-prompts``), twice what
        the confirmation half alone holds. The ``lms`` guard is StereoSet on the validation
        items of every bias type (the search never sees StereoSet, so all of them; the test
        report's StereoSet items are others).
        """
        c = self.cfg
        if axis == labels.LMS_GUARD:
            return self.spec("valid", bias="stereoset", axis="all", bootstrap_reps=VALID_BOOTSTRAP_REPS)
        # with --guard-search the search reads the axis's search half (``part``): the guard keeps to the other
        return self.spec("valid", axis=axis, prompts=c.guard_prompt_count, bootstrap_reps=VALID_BOOTSTRAP_REPS,
                         part=part or ("confirm" if c.guard_search else None))

    def guard_removal_estimates(self, axis: str) -> dict:
        """What ``--guard-search`` predicts guarded ``axis`` from, on the search half of its validation split.

        ``{"shifts": [N, B]`` every head's first-order shift of the axis's bucket means, ``"means"``
        and ``"weights"`` ``[B]`` the unrepaired model's bucket means and the buckets' weights,
        ``"bias"`` its bias there, ``"prompts"``, ``"seconds"}``: one forward and one gradient pass
        on up to ``--guard-prompts`` prompts (the guard itself reads the other half).
        """
        t = time.perf_counter()
        ev, _ = self.evaluator(self.guard_spec(axis, part="search"), with_perplexity=False)
        base = ev.evaluate([HeadMask.all_active(*self.shape)], with_perplexity=False)[0].bias_result
        measure = ev.bias_measure
        shifts = np.asarray(measure.bucket_means(measure.removal_estimates().T), dtype=float)
        names = sorted(base.buckets)
        return {"shifts": shifts.tolist(), "means": [base.buckets[b] for b in names],
                "weights": [base.bucket_weights[b] for b in names], "bias": base.bias,
                "prompts": measure.describe()["prompts"], "seconds": time.perf_counter() - t}

    def guard(self, masks: Sequence[HeadMask]) -> list[dict[str, GuardVerdict]]:
        """Each mask's verdict on every guard (``cfg.guard``), paired with the unrepaired model.

        A guard's value is a guarded axis's bias, or for ``lms`` StereoSet's error rate
        ``100 - LMS`` (the share of meaningless fillers the model does not rank last). The
        change is ``value(mask) - value(unrepaired)`` on the same items; its one-sided upper
        bound at ``cfg.confidence`` adds the paired bootstrap's (same resamples for both)
        quantile above its median to the change, and its lower bound subtracts the quantile
        below. The limit is ``cfg.guard_margin`` x the unrepaired value. With ``--guard-test
        within`` a guard holds when the upper bound is within the limit (the rise is shown to
        be at most the margin); with ``harm`` when the lower bound is (the rise is not shown
        to exceed it). Evaluations are stored (once each).

        A mask that fails a guard cannot be chosen, so the guards after it are not measured
        for that mask (its verdict holds the guards up to the first that failed): each guard
        costs an evaluation per mask, and on the default model a candidate's guards take
        minutes.
        """
        c = self.cfg
        base = HeadMask.all_active(*self.shape)
        out: list[dict[str, GuardVerdict]] = [{} for _ in masks]
        open_ = list(range(len(masks)))  # the masks that have held every guard so far
        with self.timed("guard"):
            for axis in c.guards:
                if not open_:
                    break
                ev, setting = self.evaluator(self.guard_spec(axis), with_perplexity=False)
                if c.auto_guard and self._left_out_by_auto(axis, ev, setting):
                    continue
                measured = [masks[i] for i in open_]
                rows = self.stored_rows(ev, setting, "confirm", labels.guard(axis), measured, with_perplexity=False)
                # one bootstrap for all: the unrepaired row and every mask under the same resamples
                values, boot = guarded_values(axis, ev, [rows[base], *(rows[m] for m in measured)])
                limit = c.guard_margin * values[0]
                self._warn_noise_level_guard(axis, rows[base])
                for j, i in enumerate(open_):
                    change = values[j + 1] - values[0]
                    lower, upper = change_bounds(change, boot[j + 1] - boot[0], c.confidence)
                    verdict = GuardVerdict(unrepaired=values[0], change=change, upper=upper, limit=limit, ok=False,
                                           lower=lower, test=c.guard_test)
                    verdict.ok = verdict.tested <= limit
                    out[i][axis] = verdict
                    if not verdict.ok and c.guard_test == "within" and upper - change > limit:
                        self._warn_guard_below_its_noise(axis, out[i][axis])
                open_ = [i for i in open_ if out[i][axis].ok]
        return out

    def _left_out_by_auto(self, axis: str, ev: Evaluator, setting: str) -> bool:
        """``--guard auto``: whether ``axis`` is left out (see :func:`auto_leaves_out`), said once per run.

        Measured on the unrepaired model alone, before any candidate is.
        """
        if axis == labels.LMS_GUARD:
            return False
        base = self.stored_rows(ev, setting, "confirm", labels.guard(axis), [], with_perplexity=False)[
            HeadMask.all_active(*self.shape)]
        floor = (base.bias_result.noise_floor or {}).get("p95")
        why = auto_leaves_out(base.bias, floor, self.cfg.guard_test)
        if why is None:
            return False
        left_out = self._derived.setdefault("guards_left_out", {})
        if axis not in left_out:
            left_out[axis] = {"bias": base.bias, "floor_p95": floor}
            self.log(f"--guard auto: {axis} is not guarded, {why}")
        return True

    def _warn_noise_level_guard(self, axis: str, base: StoredEvaluation) -> None:
        """Say once per run when a guarded axis's unrepaired bias is within its noise floor.

        Its limit (a share of that bias) is then smaller than the noise of the change, so the
        guard holds only for candidates that lower the axis's bias measurably.
        """
        floor = (base.bias_result.noise_floor or {}).get("p95")
        warned = self._derived.setdefault("noise_level_guards", set())
        if (axis == labels.LMS_GUARD or floor is None or axis in warned or base.bias > floor
                or self.cfg.guard_test == "harm"):  # harm refuses only a measured rise: no noise makes it refuse all
            return
        warned.add(axis)
        self.log(f"warning: --guard {axis}: its unrepaired bias {base.bias:.3f} is within its noise floor (95th "
                 f"percentile {floor:.3f}) on its guard prompts, so a limit of {self.cfg.guard_margin:g} x "
                 "that bias is below the noise of a change and the guard holds only for candidates that lower it; "
                 "raise --guard-margin, refuse only a measured rise (--guard-test harm) or guard another axis")

    def _warn_guard_below_its_noise(self, axis: str, verdict: GuardVerdict) -> None:
        """Say once per run when a guard failed although its limit is smaller than what noise adds to a change.

        The one-sided bound puts the bootstrap's spread on the point change; when that spread
        alone exceeds the limit, even a mask that leaves the axis as it was fails, and only
        masks that lower the axis's bias can hold (on the default model: ``age``, limit 0.039,
        about 0.08 of noise for a 15-head mask).
        """
        warned = self._derived.setdefault("guards_below_noise", set())
        if axis in warned:
            return
        warned.add(axis)
        noise = verdict.upper - verdict.change
        more = ""
        if axis != labels.LMS_GUARD and verdict.limit > 0:  # noise falls as 1 / sqrt(prompts)
            more = (f"raise --guard-prompts (about {(noise / verdict.limit) ** 2:.0f}x the prompts brings that noise "
                    "down to the limit, as far as its validation split holds them), ")
        self.log(f"warning: --guard {axis}: a candidate failed it with a change of {verdict.change:+.3f}, and the "
                 f"one-sided bound adds {noise:.3f} of noise to a change, more than the limit "
                 f"{verdict.limit:+.3f}: only masks that lower {axis}'s bias can hold it; {more}raise --guard-margin, "
                 "refuse only a measured rise beyond it (--guard-test harm) or guard other axes")

    def confirmation_cost(self, source: str, selection: Selection) -> tuple[int, float]:
        """(count, seconds) of the confirmations stored under ``source`` and of ``selection``'s shortlist (each once).

        A method's confirmations include those made while it searched (AP's calibration);
        (0, 0.0) when the selection confirmed nothing.
        """
        if selection.base_confirmed is None:
            return 0, 0.0
        ev, setting = self.evaluator(self.confirm_spec)
        rows: dict[str, StoredEvaluation] = {}
        # a full confirmation's seconds include its perplexity-only first part: count each mask once, full first
        for where in (setting, self.perplexity_only_setting(ev)):
            for r in self.store.evaluations(where, [source]):
                rows.setdefault(r.mask.key, r)
            for m in selection.shortlist:
                if m.key not in rows and (r := self.store.get(m, where)) is not None:
                    rows[m.key] = r
        return len(rows), float(sum(r.seconds for r in rows.values()))

    def guard_cost(self, selection: Selection) -> tuple[int, float]:
        """(count, seconds) of the guard evaluations of ``selection``'s candidates: each guard a candidate was measured on.

        The unrepaired model's guard evaluations are the reference every method's guards are
        paired with, so they are charged to none (like the shared unrepaired validation row);
        a mask guarded for two methods is charged to each, like the shared knockouts.
        """
        count, seconds = 0, 0.0
        for mask, candidate in zip(selection.shortlist, selection.candidates):
            for axis in candidate.guards or {}:
                row = self.store.get(mask, self.evaluator(self.guard_spec(axis), with_perplexity=False)[1])
                if row is not None:
                    count, seconds = count + 1, seconds + row.seconds
        return count, seconds

    def rows(self, sources: Sequence[str] | None = None, with_perplexity: bool = True) -> list[StoredEvaluation]:
        """The validation evaluations in the store (of ``sources`` when given), in insertion order.

        ``with_perplexity`` False: those of the search's bias alone (:attr:`bias_only_setting`).
        """
        if with_perplexity:
            return self.store.evaluations(self.cache_setting, sources)
        setting = self.bias_only_setting
        return [] if setting is None else self.store.evaluations(setting, sources)

    def base(self) -> StoredEvaluation:
        """The unrepaired model's validation evaluation."""
        mask = HeadMask.all_active(*self.shape)
        if self.loaded is None:
            return self.store.get(mask, self.valid_setting)
        return self.evaluate([mask], labels.SAMPLE, "unrepaired (valid)")[0]

    def gate_gradients(self) -> np.ndarray:
        """``[L, H]`` |d NLL / d gate| on the validation perplexity text."""
        return self.valid.gate_gradients()

    # ---- what a method's context reads (:class:`attnprune.methods.base.Session`) ----------
    @property
    def can_evaluate(self) -> bool:
        """Whether the model is loaded (a run opened from its store alone only reads)."""
        return self.loaded is not None

    @property
    def cache_setting(self) -> str | None:
        """The validation setting's store key; with a model loaded, its evaluator is built first if need be.

        A key read before the first evaluation must not differ from one read after it.
        """
        if self.valid_setting is None and self.loaded is not None:
            _ = self.valid
        return self.valid_setting

    @property
    def cache_scope(self) -> str:
        """The store and the validation setting: equal scopes hold the same validation evaluations."""
        return f"{self.store.path}|{self.cache_setting}"

    def meta_value(self, key: str):
        """A value kept in the store's meta table (None when absent)."""
        return self.store.meta_value(key)

    def set_meta_value(self, key: str, value) -> None:
        """Keep a JSON-ready value in the store's meta table."""
        self.store.set_meta_value(key, value)

    def measure_name(self) -> str:
        """The validation bias measure's name."""
        return self.valid.bias_measure.card.name

    def estimates_removals(self) -> bool:
        """Whether the validation measure has first-order removal estimates."""
        return self.valid.estimates_removals

    def removal_estimates(self) -> dict:
        """The validation measure's first-order removal estimates of every head (one gradient pass)."""
        return self.valid.removal_estimates()

    def perplexity_removal_estimates(self, tokens: int) -> np.ndarray:
        """``[N]`` first-order log-perplexity effect of removing each head, on ``tokens`` of the search's text half.

        The windows are evenly spread over the half of the validation text the confirmation
        never reads (the whole validation text without confirmation), so the search's
        perplexity text is among them; one gradient pass.
        """
        from attnprune.measures import get_measure

        c = self.cfg
        text = get_measure("perplexity", split="valid", max_tokens=tokens, source=c.corpus, seed=c.seed,
                           **({"part": "search"} if c.confirm > 0 else {}))
        return np.asarray(text.prepare(self.valid.backend).removal_estimates(), dtype=float)

    def unrepaired_on_search_prompts(self, prompts: int) -> dict | None:
        """The unrepaired model on up to ``prompts`` search-half validation prompts, without perplexity.

        ``{"buckets", "prompts", "bias", "seconds"}``, or None for a measure without bucket means.
        """
        spec = self.spec("valid", prompts=prompts, bootstrap_reps=VALID_BOOTSTRAP_REPS,
                         part="search" if self.cfg.confirm > 0 else None)
        ev, _ = self.evaluator(spec, with_perplexity=False)
        result = ev.evaluate([HeadMask.all_active(*self.shape)], with_perplexity=False)[0]
        buckets = result.bias_result.buckets
        if not buckets:
            return None
        return {"buckets": buckets, "prompts": ev.setup().prompts, "bias": result.bias,
                "seconds": result.seconds}

    def bucket_projection(self) -> np.ndarray | None:
        """The bucket-mean projection ``[B, n]`` of the search's validation prompts (data only, once per run)."""
        from attnprune.measures import get_measure

        if "projection" not in self._derived:
            spec = self.valid_spec
            self._derived["projection"] = get_measure(spec.bias, split=spec.split, **spec.bias_options).bucket_projection()
        return self._derived["projection"]

    def stored_rows(self, ev: Evaluator, setting: str, split: str, source: str, masks: Sequence[HeadMask],
                    with_perplexity: bool, log_name: str | None = None) -> dict[HeadMask, StoredEvaluation]:
        """``masks`` and the unrepaired model under ``ev``, each evaluated once (stored under ``source``) and read back.

        With ``log_name``, every evaluation it makes is logged (they take minutes on the test split).
        """
        base = HeadMask.all_active(*self.shape)
        rows = {}
        for m in dict.fromkeys([base, *masks]):
            stored = self.store.get(m, setting)
            if stored is None:
                if log_name:
                    self.log(f"  {log_name}: {'unrepaired' if m == base else f'{m.n_pruned} heads pruned'}, "
                             f"{split} split ...")
                self.store.add(setting, split, source, ev.evaluate([m], with_perplexity=with_perplexity)[0])
                stored = self.store.get(m, setting)
            rows[m] = stored
        return rows

    def close(self) -> None:
        """Remove hooks, stop workers and close the store (safe to call twice)."""
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        for ev, _ in self._evaluators.values():
            ev.close()
        self._evaluators.clear()
        self._valid = None
        self.store.close()


def _extend_design(store: Store, samples: int) -> None:
    """Accept another ``--samples`` while the store holds only the design: a larger design extends the same masks.

    Once a search has started, its rounds were fitted on the old design, so a different
    ``samples`` is refused like any other decision option.
    """
    recorded = store.config.get("samples")
    if recorded == samples:
        return
    searched = sorted(store.sources() - labels.DESIGN)
    if searched:
        store.close()
        raise UserError(f"Store {store.path} was made with a different configuration (samples: {recorded!r} -> "
                        f"{samples!r}) and already holds search results ({', '.join(searched[:3])}); rerun with "
                        f"--samples {recorded} or choose a new --out directory.")
    store.update_config(samples=samples)


def auto_leaves_out(bias: float, floor: float | None, test: str) -> str | None:
    """Why ``--guard auto`` leaves out an axis of unrepaired bias ``bias`` and noise floor 95th percentile ``floor``
    on its guard prompts (``None``: it is guarded).

    An axis whose prompts fall in one bucket reads 0 for every mask: nothing to guard, under either test. Under
    ``--guard-test within`` an axis whose bias is within its noise floor is left out too: its limit (a share of that
    bias) is smaller than the noise a change's upper bound adds, so it would refuse every mask that does not lower
    it. ``harm`` refuses only a rise shown beyond the limit, which noise cannot produce, so it keeps such an axis: a
    repair that raises an axis from its noise floor to a measurable bias is the harm it is there to refuse.
    """
    if floor is None or bias > floor:
        return None
    if bias == floor == 0:
        return "its prompts fall in one bucket, so its bias is 0 for every mask"
    if test == "harm":
        return None
    return (f"its unrepaired bias {bias:.3f} is within its noise floor (95th percentile {floor:.3f}) on its guard "
            "prompts")


def change_bounds(change: float, resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    """A guard's one-sided ``confidence`` bounds (lower, upper) on a paired ``change``, from its bootstrap ``resampled``.

    The bootstrap's spread around its median is put on the point change: a sum of absolute
    deviations is biased in resamples, so raw percentiles can sit below the change itself.
    """
    median = float(np.median(resampled))
    return (change - (median - float(np.quantile(resampled, 1 - confidence))),
            change + float(np.quantile(resampled, confidence)) - median)


def guarded_values(name: str, ev: Evaluator, rows: Sequence[StoredEvaluation]) -> tuple[np.ndarray, np.ndarray]:
    """What guard ``name`` keeps from rising, for each row: point values ``[k]`` and bootstrap ``[k, reps]``.

    A HolisticBias axis's bias; for the ``lms`` guard StereoSet's ``100 - LMS``.
    """
    scores = [r.prompt_scores for r in rows]
    if name == labels.LMS_GUARD:
        points = np.array([100.0 - r.bias_result.statistics["lms"]["value"] for r in rows])
        return points, 100.0 - ev.bias_measure.bootstrap_statistic(scores, "lms")
    return np.array([r.bias for r in rows]), ev.bias_measure.bootstrap_biases(scores)
