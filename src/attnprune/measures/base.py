"""The measure plug-in interface: cards, the registry, and the HolisticBias bias-measure base.

A measure is one class registered by name with :func:`register`. It is constructed with
its options, ``prepare(backend)`` tokenises its inputs once through the
:class:`~attnprune.backend.Backend`, and ``score(masks)`` returns one JSON-ready result per
mask, all masks on the same inputs. Measures hold statistics and data; the backend runs
the model.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from attnprune.data import holisticbias as hb
from attnprune.errors import UserError
from attnprune.heads import HeadMask


@dataclass(frozen=True)
class Card:
    """What a measure measures, from what data, under what license, with what limits."""

    name: str
    measures: str
    inputs: str
    data_source: str
    license: str
    citation: str
    limits: str

    def to_dict(self) -> dict:
        """JSON-ready card."""
        return asdict(self)


class Measure(ABC):
    """A measurement of a (masked) model. Subclasses set :attr:`card` and :attr:`kind`."""

    card: Card
    kind: str  # "bias" or "utility"

    @abstractmethod
    def prepare(self, backend) -> "Measure":
        """Tokenise inputs through ``backend`` (a :class:`~attnprune.backend.Backend`); return self."""

    @abstractmethod
    def score(self, masks: Sequence[HeadMask]) -> list[dict]:
        """One JSON-ready result per mask, all masks evaluated on the same inputs."""

    def describe(self) -> dict:
        """Sizes, seeds and sources of the prepared inputs (for every reported number)."""
        return {}


class BiasMeasure(Measure):
    """A bias measure: per-item scores, a bias statistic with a bootstrap CI, paired differences.

    ``score`` results hold ``bias``, ``ci`` and ``per_prompt`` (the per-item scores the
    statistic is computed from); :meth:`paired_difference` compares two masks on the same
    items. Subclasses set ``seed`` and ``bootstrap_reps``.

    Optional capabilities, declared rather than detected (a method asks for them through
    its context): :attr:`first_order` says :meth:`removal_estimates` works;
    :meth:`bucket_means` and :meth:`bucket_projection` return None for a measure without
    identity buckets.
    """

    kind = "bias"
    seed: int
    bootstrap_reps: int
    first_order: bool = False  # True: removal_estimates() gives every head's first-order effect per item

    def removal_estimates(self) -> np.ndarray:
        """``[n, L*H]`` first-order change of each item's score when each head is removed (when :attr:`first_order`)."""
        raise UserError(f"{self.card.name} has no first-order removal estimates; use --knockouts 1 (every head).")

    def bucket_means(self, per_item) -> np.ndarray | None:
        """Bucket means ``[..., B]`` of per-item score rows ``[..., n]`` (the statistic's summary), or None."""
        return None

    def bucket_projection(self) -> np.ndarray | None:
        """The ``[B, n]`` matrix that maps per-item scores to bucket means (from the data alone), or None."""
        return None

    @abstractmethod
    def paired_difference(self, scores_a, scores_b) -> dict:
        """``{"a", "b", "diff", "diff_ci"}``: the statistic of two masks on the same items and the CI of ``a - b``."""

    @abstractmethod
    def bootstrap_biases(self, rows) -> np.ndarray:
        """``[k, reps]`` the bias of each of ``k`` masks' per-item scores under the same bootstrap resamples."""

    @classmethod
    def check_axis(cls, axis: str, holisticbias: str | None = None) -> None:
        """Refuse, with one sentence, an axis this measure has no data for (before any model work)."""


# prompts of a HolisticBias measure built without a size (the library default; the CLI's options set their own)
DEFAULT_PROMPTS = 160


class HolisticBiasMeasure(BiasMeasure):
    """Base of the measures on HolisticBias prompts of one axis: prompts, bucket design, statistics.

    Fitted by :meth:`prepare_prompts` (``prepare`` calls it): ``prompts_``, ``shares_`` (each
    bucket's share of the split) and ``design_`` (the :class:`~attnprune.stats.BucketDesign`).

    Bias = ``sum_b |mean(axis) - mean(bucket b)|`` over per-prompt scores, with bucket means
    template-adjusted by default (:mod:`attnprune.stats`); every value comes with a
    stratified bootstrap CI and the noise floor.
    """

    def __init__(self, axis: str = "gender_and_sex", split: str = "valid", prompts: int = DEFAULT_PROMPTS,
                 seed: int = 0, holisticbias: str | None = None, bootstrap_reps: int = 1000, adjust: str = "template",
                 part: str = "all"):
        self.axis, self.split, self.n_prompts, self.seed = axis, split, prompts, seed
        self.data_path, self.bootstrap_reps, self.part = holisticbias, bootstrap_reps, part
        self.adjust = hb.check_adjust(adjust)

    prompts_: list
    shares_: dict
    design_: "object"  # attnprune.stats.BucketDesign

    @classmethod
    def check_axis(cls, axis: str, holisticbias: str | None = None) -> None:
        hb.check_axis(axis, holisticbias)

    def prepare_prompts(self) -> None:
        """Choose the prompts and their bucket design (called by ``prepare``)."""
        self.prompts_ = hb.subset(self.axis, self.split, self.n_prompts, self.seed, self.data_path, part=self.part)
        self.shares_ = hb.bucket_shares(self.axis, self.split, self.seed, self.data_path)
        self.design_ = hb.design(self.prompts_, self.shares_, self.adjust)

    def describe_prompts(self) -> dict:
        """The prompt side of :meth:`describe`."""
        out = {
            "axis": self.axis, "split": self.split, "prompts": len(self.prompts_), "prompt_seed": self.seed,
            "bucket_means": "template-adjusted" if self.adjust == "template" else "raw",
        }
        if self.part != "all":
            out["part"] = self.part
        return out

    def bucket_means(self, per_item) -> np.ndarray:
        return self.design_.means(np.asarray(per_item, dtype=float))

    def bucket_projection(self) -> np.ndarray:
        if not hasattr(self, "design_"):  # the prompts alone: no model needed
            self.prepare_prompts()
        return self.design_.projection

    def bucket_counts(self) -> dict[str, int]:
        """Prompts per bucket."""
        return {b: sum(p.bucket == b for p in self.prompts_) for b in self.shares_}

    def statistics(self, per_prompt: np.ndarray) -> dict:
        """Bias with bootstrap CI, noise floor, per-bucket means, and the per-prompt scores."""
        boot = self.design_.bootstrap(per_prompt, reps=self.bootstrap_reps, seed=self.seed)
        floor = self.design_.noise_floor(per_prompt, seed=self.seed)
        return {
            "bias": boot["bias"], "ci": boot["ci"], "ci_level": boot["level"],
            "noise_floor": floor,
            "noise_corrected": {**self.design_.noise_corrected(per_prompt), "excess": boot["bias"] - floor["mean"]},
            "buckets": dict(zip(self.design_.names, self.design_.means(per_prompt).tolist())),
            "bucket_weights": dict(zip(self.design_.names, self.design_.weights.tolist())),
            "per_prompt": np.asarray(per_prompt, dtype=float).tolist(),
        }

    def bootstrap_biases(self, rows) -> np.ndarray:
        return self.design_.bootstrap_biases(np.asarray(rows, dtype=float), reps=self.bootstrap_reps, seed=self.seed)

    def paired_difference(self, scores_a, scores_b) -> dict:
        boot = self.design_.bootstrap([scores_a, scores_b], reps=self.bootstrap_reps, seed=self.seed)
        return {"a": boot["bias"][0], "b": boot["bias"][1], "diff": boot["diff"], "diff_ci": boot["diff_ci"]}


class ItemBiasMeasure(BiasMeasure):
    """A bias measure over independent items (sentence pairs, triples) of a benchmark with its own statistics.

    Subclasses give :meth:`item_statistics` (named statistics of per-item scores, under
    bootstrap resamples of the items) and :attr:`main` (the statistic that is the measure's
    ``bias``: lower is fairer). CIs come from a bootstrap over items, stratified by
    :attr:`strata_` (set in ``prepare``); a paired difference uses the same resamples for
    both masks.
    """

    main = "bias"
    strata_: list[str]

    def __init__(self, axis: str = "gender_and_sex", split: str = "valid", seed: int = 0, bootstrap_reps: int = 1000,
                 batch_size: int = 32, part: str = "all"):
        if part not in hb.PARTS:
            raise UserError(f"Unknown item part '{part}'; use one of {', '.join(hb.PARTS)}.")
        self.axis, self.split, self.seed, self.part = axis, split, seed, part
        self.bootstrap_reps, self.batch_size = bootstrap_reps, batch_size

    def take_part(self, items: Sequence, key: Callable) -> list:
        """The items of :attr:`part`: all, or one of two seeded disjoint halves (``search``, ``confirm``)."""
        from attnprune.data.packaged import rank

        if self.part == "all":
            return list(items)
        ordered = sorted(items, key=lambda it: rank(key(it), f"part{self.seed}"))
        half = len(ordered) // 2
        return ordered[:half] if self.part == "search" else ordered[half:]

    @abstractmethod
    def item_statistics(self, scores: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Named statistics ``[reps]`` of per-item ``scores`` ``[n, ...]`` resampled by ``idx`` ``[reps, n]``."""

    def sentence_rows(self, backend, sentences: Sequence[str]):
        """Backend rows of ``sentences``, each after the model's start token (BOS, else EOS)."""
        tok = backend.tokenizer
        start = next((t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None), 0)
        self.backend_ = backend
        return backend.rows([[start, *tok(s, add_special_tokens=False).input_ids] for s in sentences])

    def _resamples(self) -> np.ndarray:
        from attnprune.stats import stratified_resamples

        return stratified_resamples(self.strata_, self.bootstrap_reps, self.seed)

    def _identity(self) -> np.ndarray:
        """The point estimate's "resample": every item once."""
        return np.arange(len(self.strata_))[None, :]

    def statistics(self, scores: np.ndarray) -> dict:
        """Every statistic with its bootstrap CI; ``bias``/``ci`` are the main one's."""
        from attnprune.stats import percentile_ci

        point = {k: float(v[0]) for k, v in self.item_statistics(scores, self._identity()).items()}
        boot = self.item_statistics(scores, self._resamples())
        out = {"bias": point[self.main], "ci": percentile_ci(boot[self.main]), "ci_level": 0.95,
               "statistics": {k: {"value": v, "ci": percentile_ci(boot[k])} for k, v in point.items()},
               "items": len(scores), "per_prompt": np.asarray(scores, dtype=float).reshape(-1).tolist()}
        return out

    def paired_difference(self, scores_a, scores_b) -> dict:
        from attnprune.stats import percentile_ci

        a, b = (self.item_scores(np.asarray(s, dtype=float)) for s in (scores_a, scores_b))
        idx = self._resamples()
        pa, pb = self.item_statistics(a, self._identity()), self.item_statistics(b, self._identity())
        ba, bb = self.item_statistics(a, idx), self.item_statistics(b, idx)
        stats = {k: {"a": float(pa[k][0]), "b": float(pb[k][0]), "diff": float(pa[k][0] - pb[k][0]),
                     "diff_ci": percentile_ci(ba[k] - bb[k])} for k in pa}
        main = stats[self.main]
        return {"a": main["a"], "b": main["b"], "diff": main["diff"], "diff_ci": main["diff_ci"], "statistics": stats}

    def bootstrap_biases(self, rows) -> np.ndarray:
        return self.bootstrap_statistic(rows, self.main)

    def bootstrap_statistic(self, rows, name: str) -> np.ndarray:
        """``[k, reps]`` the statistic ``name`` of each of ``k`` masks' per-item scores under the same resamples."""
        idx = self._resamples()
        return np.stack([self.item_statistics(self.item_scores(np.asarray(r, dtype=float)), idx)[name] for r in rows])

    def item_scores(self, flat: np.ndarray) -> np.ndarray:
        """Per-item scores ``[n, ...]`` from the flat ``per_prompt`` list (subclasses with several scores per item reshape)."""
        return flat


_REGISTRY: dict[str, type[Measure]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a measure available by ``name``."""

    def deco(cls):
        _REGISTRY[name] = cls
        return cls

    return deco


def measure_class(name: str) -> type[Measure]:
    """The registered measure ``name``."""
    if name not in _REGISTRY:
        raise UserError(f"Unknown measure '{name}'; choose one of {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def get_measure(name: str, **options) -> Measure:
    """Construct the registered measure ``name`` with ``options``."""
    return measure_class(name)(**options)


def accepted_options(name: str, options: dict) -> dict:
    """The subset of ``options`` that measure ``name`` takes (shared option sets feed several measures)."""
    params = inspect.signature(measure_class(name).__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def measure_names(kind: str | None = None) -> list[str]:
    """Registered measure names (of ``kind`` when given)."""
    return sorted(n for n, c in _REGISTRY.items() if kind is None or getattr(c, "kind", None) == kind)
