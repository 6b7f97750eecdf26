"""The Attention Pruning repair (arXiv 2503.15815), end to end, as a Python API.

Stages (each usable alone; everything after sampling reruns from the store):

1. ``sample``: random masks (ratio r ~ U(r_min, r_max), floor(r * N) heads) plus the
   all-active mask, each evaluated on the real model (validation split) and committed to
   the run's SQLite store as it completes.
2. ``fit``: surrogates mask -> bias and mask -> log-perplexity, with K-fold metrics and the
   ridge reference.
3. ``search``: simulated annealing on the surrogates under the perplexity budget.
4. ``validate``: the top-k candidates on the real model (validation); optionally more rounds
   with the surrogates refitted on the new evaluations. The chosen mask is the lowest
   validation bias among all real-evaluated masks within the budget.
5. ``test``: the unrepaired and the chosen mask on the held-out TEST split (bias with CI and
   paired difference, perplexity, a toxicity-protocol second opinion, transfer axes).
6. export of the repaired model and the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from attnprune.config import RepairConfig
from attnprune.errors import UserError
from attnprune.evaluation import Evaluator
from attnprune.executors import EvaluatorSpec, Executor, make_executor
from attnprune.heads import HeadMask
from attnprune.search.annealing import AnnealingResult, anneal
from attnprune.store import Store, StoredEvaluation
from attnprune.surrogate import SurrogatePair, fit_surrogates

Log = Callable[[str], None]


def random_masks(n: int, shape: tuple[int, int], r_min: float, r_max: float, seed: int) -> list[HeadMask]:
    """The all-active mask, then ``n`` random masks; a larger ``n`` extends the same sequence."""
    total = shape[0] * shape[1]
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
        pruned = rng.choice(total, size=k, replace=False)
        m = HeadMask.from_pruned(*shape, [divmod(int(i), shape[1]) for i in pruned])
        if m.key not in seen:
            seen.add(m.key)
            masks.append(m)
    return masks


def pruned_bounds(cfg: RepairConfig, total: int) -> tuple[int, int]:
    """[k_min, k_max] pruned heads for the search."""
    return max(1, int(math.floor(cfg.r_min * total))), max(1, int(math.floor(cfg.r_max * total)))


@dataclass
class Run:
    """An open run: model, store, validation evaluator (lazily) and configuration."""

    cfg: RepairConfig
    loaded: object
    store: Store
    log: Log = print
    _valid: Evaluator | None = None
    _executor: Executor | None = None
    timings: dict = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: RepairConfig, loaded=None, log: Log = print) -> "Run":
        """Load the model (unless given) and open or create the run's store."""
        from attnprune.models import load_model

        cfg.validate()
        t = time.perf_counter()
        if loaded is None:
            log(f"loading {cfg.model} ...")
            loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir,
                                device_map=cfg.device_map)
        store_cfg = {k: getattr(cfg, k) for k in RepairConfig.STORE_KEYS}
        store_cfg["model"] = loaded.name
        store = Store(cfg.out_dir / "store.sqlite", loaded.layout.shape, store_cfg)
        run = cls(cfg, loaded, store, log)
        run.timings["load"] = time.perf_counter() - t
        return run

    @classmethod
    def from_store(cls, cfg: RepairConfig, log: Log = print) -> "Run":
        """Open an existing run's store without loading the model (fit and search need only the store)."""
        store_cfg = {k: getattr(cfg, k) for k in RepairConfig.STORE_KEYS}
        store = Store(cfg.out_dir / "store.sqlite", None)
        stored_cfg = store.config
        store_cfg["model"] = stored_cfg.get("model", cfg.model)
        store._check_meta(store_cfg, None)
        run = cls(cfg, None, store, log)
        run.valid_setting = store.setting_of("sample")
        if run.valid_setting is None:
            raise UserError(f"Store {store.path} holds no sampled masks yet; run `attnprune sample` first.")
        return run

    @property
    def shape(self) -> tuple[int, int]:
        """``(layers, heads)`` of the run's model."""
        return tuple(self.store.shape)  # type: ignore[return-value]

    # evaluators -------------------------------------------------------------------------
    def measure_options(self, bias: str) -> tuple[dict, dict]:
        """Speed options this run's evaluators pass to the bias measure ``bias`` and to perplexity."""
        from attnprune.benchmarks.base import reuses_layers

        c = self.cfg
        speed = {"reuse_layers": c.reuse_layers and c.layer_cache_mb > 0, "cache_mb": c.layer_cache_mb}
        return (dict(speed) if reuses_layers(bias) else {}), speed

    @property
    def valid_spec(self) -> EvaluatorSpec:
        """The recipe of the validation evaluator (what Ray workers build too)."""
        c = self.cfg
        bias_speed, ppl_speed = self.measure_options(c.bias)
        return EvaluatorSpec(
            model=c.model, bias=c.bias, split="valid", device=c.device, dtype=c.dtype, device_map=c.device_map,
            cache_dir=c.cache_dir,
            # 200 bootstrap replicates while searching (the CI of each sample is recorded, not
            # used for decisions); the test split uses the measures' default of 1,000
            bias_options={"axis": c.axis, "prompts": c.prompts, "seed": c.seed, "holisticbias": c.holisticbias,
                          "bootstrap_reps": 200, **bias_speed},
            perplexity_options={"max_tokens": c.ppl_tokens, "source": c.corpus, **ppl_speed},
        )

    @property
    def valid(self) -> Evaluator:
        """The validation-split evaluator used by sampling and candidate validation."""
        if self._valid is None:
            self._valid = self.valid_spec.build(self.loaded)
            self.valid_setting = self.store.register_setting(self._valid.describe())
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

    def evaluate_into_store(self, masks: list[HeadMask], source: str, desc: str) -> list[StoredEvaluation]:
        """Evaluate (validation split) the masks not yet stored, committing each as it arrives; return all."""
        _ = self.valid
        todo = [m for m in dict.fromkeys(masks) if self.store.get(m, self.valid_setting) is None]
        if todo:
            with tqdm(total=len(todo), desc=desc, unit="mask", dynamic_ncols=True) as bar:
                def commit(ev) -> None:
                    self.store.add(self.valid_setting, "valid", source, ev)
                    bar.update(1)

                self.executor.evaluate(todo, commit)
        return [self.store.get(m, self.valid_setting) for m in masks]

    # stages ----------------------------------------------------------------------------
    def sample(self) -> list[StoredEvaluation]:
        """Stage 1: evaluate the all-active mask and ``cfg.samples`` random masks."""
        t = time.perf_counter()
        masks = random_masks(self.cfg.samples, self.shape, self.cfg.r_min, self.cfg.r_max, self.cfg.seed)
        _ = self.valid
        done = len(self.store.keys(self.valid_setting) & {m.key for m in masks})
        if done:
            self.log(f"store {self.store.path}: {done} of {len(masks)} sample masks already evaluated, continuing")
        out = self.evaluate_into_store(masks, "sample", "sampling (valid)")
        self.timings["sample"] = self.timings.get("sample", 0) + time.perf_counter() - t
        return out

    def training_data(self, before_round: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[StoredEvaluation]]:
        """(X bits, bias, log-perplexity, rows) of the validation evaluations in the store.

        With ``before_round=r``: the samples and the candidates of rounds before ``r`` only,
        so that round ``r`` sees the same data in a rerun as in the first run.
        """
        sources = None if before_round is None else ["sample"] + [f"candidate-r{j}" for j in range(before_round)]
        rows = self.store.evaluations(self.valid_setting, sources)
        X = np.stack([r.mask.bits for r in rows])
        return X, np.array([r.bias for r in rows]), np.log(np.clip([r.perplexity for r in rows], 1e-6, 1e6)), rows

    def base(self) -> StoredEvaluation:
        """The unrepaired model's validation evaluation."""
        mask = HeadMask.all_active(*self.shape)
        if self.loaded is None:
            return self.store.get(mask, self.valid_setting)
        return self.evaluate_into_store([mask], "sample", "unrepaired (valid)")[0]

    def fit(self, round_: int | None = None) -> SurrogatePair:
        """Stage 2: fit both surrogates on the validation evaluations (those before ``round_`` when given)."""
        t = time.perf_counter()
        X, bias, logppl, _ = self.training_data(round_)
        pair = fit_surrogates(X, bias, logppl, kind=self.cfg.surrogate, seed=self.cfg.seed)
        self.timings["fit"] = self.timings.get("fit", 0) + time.perf_counter() - t
        return pair

    def cost_function(self, pair: SurrogatePair, bias_scale: float):
        """Surrogate cost: predicted bias + penalty for a predicted perplexity increase above ``tau``.

        The budget is relative to the surrogate's own prediction for the unrepaired model, so a
        constant offset of the surrogate (it sees the all-active mask once among ~100 samples)
        does not make every state look over budget.
        """
        shape_total = self.shape[0] * self.shape[1]
        _, base_lp = pair.predict_torch(torch.ones(1, shape_total))
        log_budget = float(base_lp[0]) + math.log(1 + self.cfg.tau)
        unit = math.log(1 + max(self.cfg.tau, 1e-3))
        weight = self.cfg.penalty * bias_scale

        def cost(states: torch.Tensor) -> torch.Tensor:
            b, lp = pair.predict_torch(states)
            return b + weight * torch.clamp(lp - log_budget, min=0) / unit

        return cost

    def search(self, pair: SurrogatePair, round_: int | None = None) -> AnnealingResult:
        """Stage 3: anneal on the surrogates."""
        t = time.perf_counter()
        _, bias, _, rows = self.training_data(round_)
        total = self.shape[0] * self.shape[1]
        k_min, k_max = pruned_bounds(self.cfg, total)
        # Trust region: surrogates fitted on ~100 masks are easy to fool far from the data (on
        # SmolLM2 the annealer found 54-head masks predicted at +3% perplexity that measured
        # +60%). Search only up to the pruned count where evaluated masks met the budget, plus 25%.
        budget = self.budget()
        feasible = [r.mask.n_pruned for r in rows if r.perplexity <= budget and r.mask.n_pruned > 0]
        if feasible:
            k_max = max(k_min, min(k_max, int(math.ceil(max(feasible) * 1.25))))
        self.search_bounds_ = (k_min, k_max)
        cost = self.cost_function(pair, float(np.std(bias) or 1.0))
        c = self.cfg
        res = anneal(cost, total, k_min, k_max, chains=c.chains, steps=c.steps, seed=c.seed + 1000 * (round_ or 0),
                     t0=c.t0, cooling=c.cooling, top=max(50, 4 * c.top_k))
        self.timings["search"] = self.timings.get("search", 0) + time.perf_counter() - t
        return res

    def validate(self, result: AnnealingResult, pair: SurrogatePair, round_: int) -> list[dict]:
        """Stage 4: evaluate the best ``top_k`` new candidates on the real model (validation)."""
        t = time.perf_counter()
        shape = self.shape
        known = {r.mask.key for r in self.training_data(round_)[3]}
        picked = []
        for state, c in zip(result.states, result.costs):
            m = HeadMask(state.reshape(shape))
            if m.key not in known and m not in picked:
                picked.append(m)
            if len(picked) == self.cfg.top_k:
                break
        rows = self.evaluate_into_store(picked, f"candidate-r{round_}",
                                        f"validating candidates, round {round_ + 1}")
        X = torch.as_tensor(np.stack([m.bits for m in picked])) if picked else torch.zeros(0, shape[0] * shape[1])
        pb, plp = pair.predict_torch(X) if picked else (torch.zeros(0), torch.zeros(0))
        self.timings["validate"] = self.timings.get("validate", 0) + time.perf_counter() - t
        return [
            {"round": round_, "n_pruned": m.n_pruned, "pruned": [list(p) for p in m.pruned],
             "predicted_bias": float(b), "predicted_perplexity": float(math.exp(lp)),
             "bias": r.bias, "perplexity": r.perplexity}
            for m, r, b, lp in zip(picked, rows, pb, plp)
        ]

    def attention_pruning(self) -> dict:
        """Stages 2-4 for ``cfg.rounds`` rounds: fit, anneal, validate the top candidates."""
        cfg, log = self.cfg, self.log
        rounds, surrogate_metrics, annealing = [], [], []
        for r in range(cfg.rounds):
            pair = self.fit(r)
            cv = pair.metrics["cv"]
            surrogate_metrics.append({"round": r, **pair.metrics})
            log(f"round {r + 1}: surrogates on {pair.metrics['samples']} masks, CV Spearman "
                f"bias {cv['bias'][cfg.surrogate]['spearman']:.2f} (ridge {cv['bias']['ridge']['spearman']:.2f}), "
                f"log-ppl {cv['log_perplexity'][cfg.surrogate]['spearman']:.2f} "
                f"(ridge {cv['log_perplexity']['ridge']['spearman']:.2f})")
            res = self.search(pair, r)
            annealing.append({"round": r, "pruned_bounds": list(self.search_bounds_), "t0": res.t0, "states_scored": res.states_scored, "seconds": res.seconds,
                              "states_per_second": res.states_per_second, "best_cost": float(res.costs[0]),
                              "trace": res.trace})
            log(f"round {r + 1}: annealed {res.states_scored:,} states with {self.search_bounds_[0]}-"
                f"{self.search_bounds_[1]} heads pruned in {res.seconds:.1f} s ({res.states_per_second:,.0f}/s)")
            rounds.extend(self.validate(res, pair, r))
        sources = ["sample"] + [f"candidate-r{j}" for j in range(cfg.rounds)]
        return {"surrogates": surrogate_metrics, "annealing": annealing, "candidates": rounds,
                "rows": self.store.evaluations(self.valid_setting, sources)}

    def budget(self) -> float:
        """The validation perplexity budget, (1 + tau) x the unrepaired model's."""
        return self.base().perplexity * (1 + self.cfg.tau)

    def best_within_budget(self, rows: list[StoredEvaluation]) -> StoredEvaluation | None:
        """Lowest validation bias among ``rows`` that prune something, meet the budget and beat the unrepaired model."""
        base, budget = self.base(), self.budget()
        ok = [r for r in rows if r.mask.n_pruned > 0 and r.perplexity <= budget and r.bias < base.bias]
        return min(ok, key=lambda r: r.bias) if ok else None

    def choose(self, rows: list[StoredEvaluation] | None = None) -> StoredEvaluation:
        """Lowest validation bias among ``rows`` (default: all validation evaluations) within the budget."""
        best = self.best_within_budget(rows if rows is not None else self.store.evaluations(self.valid_setting))
        if best is None:
            base = self.base()
            raise UserError(
                f"No evaluated mask lowers validation bias below {base.bias:.3f} while keeping perplexity within "
                f"{1 + self.cfg.tau:.2f} x {base.perplexity:.2f}; raise --tau, --samples or --rounds (the store keeps "
                "every evaluation, so a rerun continues)."
            )
        return best

    def test_measure(self, name: str, bias: str, axis: str, prompts: int, extra: dict, with_ppl: bool,
                     masks: list[HeadMask]) -> list[dict]:
        """Each of ``masks`` vs the unrepaired model on the TEST split, stored and paired on the same prompts."""
        c = self.cfg
        key = (bias, axis, prompts, tuple(sorted(extra.items())), with_ppl)
        self._test_evaluators = getattr(self, "_test_evaluators", {})
        if key not in self._test_evaluators:
            bias_speed, ppl_speed = self.measure_options(bias)
            ev = Evaluator(self.loaded, bias=bias, split="test",
                           bias_options={"axis": axis, "prompts": prompts, "seed": c.seed,
                                         "holisticbias": c.holisticbias, **extra, **bias_speed},
                           perplexity_options={"max_tokens": c.test_ppl_tokens, "source": c.corpus, **ppl_speed})
            self._test_evaluators[key] = (ev, self.store.register_setting({**ev.describe(), "with_perplexity": with_ppl}))
        ev, setting = self._test_evaluators[key]
        base = HeadMask.all_active(*self.shape)
        rows = {}
        for m in dict.fromkeys([base, *masks]):
            stored = self.store.get(m, setting)
            if stored is None:
                self.log(f"  {name}: {'unrepaired' if m == base else f'{m.n_pruned} heads pruned'}, test split ...")
                self.store.add(setting, "test", f"test:{name}", ev.evaluate([m], with_perplexity=with_ppl)[0])
                stored = self.store.get(m, setting)
            rows[m] = stored
        out = []
        for m in masks:
            b, r = rows[base], rows[m]
            paired = ev.bias_measure.paired_difference(b.detail["prompt_scores"], r.detail["prompt_scores"])
            res = {
                "setup": ev.describe(), "card": ev.bias_measure.card.to_dict(),
                "unrepaired": _summary(b, with_ppl), "repaired": _summary(r, with_ppl),
                # repaired - unrepaired, with the paired bootstrap CI (same prompts, same resamples)
                "bias_change": {
                    "absolute": -paired["diff"], "ci": [-paired["diff_ci"][1], -paired["diff_ci"][0]],
                    "relative": -paired["diff"] / b.bias if b.bias else float("nan"),
                },
            }
            if with_ppl:
                res["perplexity_change"] = r.perplexity / b.perplexity - 1
            out.append(res)
        return out

    def test(self, chosen: HeadMask) -> dict:
        """Stage 5: unrepaired vs chosen on the TEST split (search measure, second opinion, transfer axes)."""
        t = time.perf_counter()
        c = self.cfg
        out: dict = {}
        self.log("measuring on the TEST split ...")
        out["search_measure"] = self.test_measure(c.bias, c.bias, c.axis, c.test_prompts, {}, True, [chosen])[0]
        if c.second_opinion != "none":
            out["toxicity"] = self.test_measure(f"toxicity/{c.second_opinion}", "toxicity", c.axis, c.toxicity_prompts,
                                                {"classifier": c.second_opinion}, False, [chosen])[0]
        for axis in transfer_axes(c):
            out.setdefault("transfer", {})[axis] = self.test_measure(f"{c.bias}/{axis}", c.bias, axis, c.test_prompts,
                                                                     {}, False, [chosen])[0]
        self.timings["test"] = self.timings.get("test", 0) + time.perf_counter() - t
        return out

    def close(self) -> None:
        """Remove hooks and close the store."""
        for ev, _ in getattr(self, "_test_evaluators", {}).values():
            ev.close()
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        if self._valid is not None:
            self._valid.close()
        self.store.close()


def transfer_axes(cfg: RepairConfig) -> list[str]:
    """The other axes named in ``cfg.transfer_axes``."""
    return [a.strip() for a in cfg.transfer_axes.split(",") if a.strip()]


def _summary(row: StoredEvaluation, with_ppl: bool) -> dict:
    d = {"bias": row.bias, "ci": list(row.bias_ci), "noise_floor": row.detail["bias"].get("noise_floor"),
         "buckets": row.detail["bias"].get("buckets"), "n_pruned": row.mask.n_pruned}
    for k in ("mean_toxicity", "share_toxic", "mean_score"):
        if k in row.detail["bias"]:
            d[k] = row.detail["bias"][k]
    if with_ppl:
        d["perplexity"] = row.perplexity
        d["perplexity_tokens"] = row.detail["perplexity"].get("tokens")
    return d


@dataclass
class RepairResult:
    """What a repair produced: the chosen mask, the numbers, and where the files are."""

    mask: HeadMask
    report: dict
    out_dir: Path
    model_dir: Path | None


def repair(cfg: RepairConfig, loaded=None, log: Log = print) -> RepairResult:
    """Run the whole Attention Pruning repair (see module docstring) and write its outputs."""
    from attnprune.report import write_report

    t_start = time.perf_counter()
    run = Run.open(cfg, loaded, log)
    lay = run.loaded.layout
    log(f"{run.loaded.name}: {lay.n_layers} layers x {lay.n_heads} heads = {lay.n_total}; output {cfg.out_dir}")
    evals_before = run.store.count()
    run.sample()
    base = run.base()
    log(f"unrepaired (valid): bias {base.bias:.3f} [{base.bias_ci[0]:.3f}, {base.bias_ci[1]:.3f}], "
        f"perplexity {base.perplexity:.2f}; budget {base.perplexity * (1 + cfg.tau):.2f}")
    search = run.attention_pruning()
    chosen = run.choose(search["rows"])
    log(f"chosen (valid): {chosen.mask.n_pruned} heads pruned, bias {chosen.bias:.3f}, perplexity "
        f"{chosen.perplexity:.2f} (from {chosen.source})")
    test = run.test(chosen.mask)
    out = cfg.out_dir
    chosen.mask.save(out / "mask.json", model=run.loaded.name, source=chosen.source,
                     validation_bias=chosen.bias, validation_perplexity=chosen.perplexity)
    model_dir = None
    if cfg.export:
        from attnprune.export import export_repaired

        model_dir = export_repaired(run.loaded.model, run.loaded.tokenizer, lay, chosen.mask, out / "model",
                                    model_name=run.loaded.name,
                                    provenance={"method": "attention-pruning", "config": cfg.to_dict(),
                                                "test_split": test["search_measure"]["repaired"]})
    X, bias, logppl, rows = run.training_data()
    valid_points = [{"n_pruned": r.mask.n_pruned, "bias": r.bias, "perplexity": r.perplexity, "source": r.source,
                     "key": r.mask.key} for r in rows]
    report = {
        "model": run.loaded.name, "layout": lay.describe(), "config": cfg.to_dict(),
        "validation": {"setup": run.valid.describe(), "unrepaired": {"bias": base.bias, "ci": list(base.bias_ci),
                                                                     "perplexity": base.perplexity},
                       "chosen": {"bias": chosen.bias, "ci": list(chosen.bias_ci), "perplexity": chosen.perplexity,
                                  "source": chosen.source},
                       "budget": base.perplexity * (1 + cfg.tau), "points": valid_points},
        "surrogates": search["surrogates"], "annealing": search["annealing"], "candidates": search["candidates"],
        "chosen_mask": chosen.mask.to_dict(run.loaded.name), "test": test,
        "llm_evaluations": {"validation": len(rows), "new_this_run": run.store.count() - evals_before,
                            "in_store": run.store.count()},
        "timings_s": {**run.timings, "total": time.perf_counter() - t_start},
        "outputs": {"store": str(run.store.path), "mask": str(out / "mask.json"),
                    "model": str(model_dir) if model_dir else None},
    }
    write_report(report, out)
    run.close()
    return RepairResult(chosen.mask, report, out, model_dir)
