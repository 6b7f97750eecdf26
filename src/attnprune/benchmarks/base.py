"""The measurement plug-in interface: cards, the registry, and the batched masked forward.

A measure is one class registered by name with :func:`register`. It is constructed with its
options, ``prepare(loaded)`` tokenises its inputs once for a loaded model, and
``score(masker, masks)`` returns one result per mask, running all masks through the model
together (each batch row carries its own mask).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch

from attnprune.errors import UserError
from attnprune.heads import HeadMask, HeadMasker
from attnprune.layercache import LayerInputCache, PastFor, first_pruned_layer, forward_rows, trim_left_padding


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
    def prepare(self, loaded) -> "Measure":
        """Tokenise inputs for ``loaded`` (a :class:`~attnprune.models.LoadedModel`); return self."""

    @abstractmethod
    def score(self, masker: HeadMasker, masks: Sequence[HeadMask]) -> list[dict]:
        """One JSON-ready result per mask, all masks evaluated on the same inputs."""

    def describe(self) -> dict:
        """Sizes, seeds and sources of the prepared inputs (for every reported number)."""
        return {}

    def release(self) -> None:
        """Drop memory held for speed (caches); the measure stays usable."""

    def paired_difference(self, scores_a, scores_b) -> dict:
        """Bias of two masks on the same prompts and the paired bootstrap CI of ``a - b``.

        ``scores_*`` are the per-prompt scores (``per_prompt`` of a bias result); bias
        measures set ``design_`` (a :class:`~attnprune.stats.BucketDesign`), ``seed`` and
        ``bootstrap_reps`` in ``prepare``.
        """
        return self.design_.bootstrap([scores_a, scores_b], reps=self.bootstrap_reps, seed=self.seed)


_REGISTRY: dict[str, Callable[..., Measure]] = {}


def register(name: str):
    """Class decorator: make a measure available by ``name``."""

    def deco(cls):
        _REGISTRY[name] = cls
        return cls

    return deco


def get_measure(name: str, **options) -> Measure:
    """Construct the registered measure ``name`` with ``options``."""
    if name not in _REGISTRY:
        raise UserError(f"Unknown measure '{name}'; choose one of {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name](**options)


def reuses_layers(name: str) -> bool:
    """Whether the registered measure ``name`` takes the layer-reuse options."""
    return isinstance(_REGISTRY.get(name), type) and issubclass(_REGISTRY[name], ReusesLayers)


def measure_names(kind: str | None = None) -> list[str]:
    """Registered measure names (of ``kind`` when given)."""
    return sorted(n for n, c in _REGISTRY.items() if kind is None or getattr(c, "kind", None) == kind)


def row_batches(n_rows: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` rows."""
    for start in range(0, n_rows, batch_size):
        yield slice(start, min(start + batch_size, n_rows))


def mask_rows(masks: Sequence[HeadMask], rows_per_mask: int) -> torch.Tensor:
    """``[n_masks * rows_per_mask, L, H]``: each mask repeated for its rows (mask-major)."""
    stacked = torch.stack([m.tensor() for m in masks])
    return stacked.repeat_interleave(rows_per_mask, dim=0)


@torch.no_grad()
def masked_forward(
    model: torch.nn.Module,
    masker: HeadMasker,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    row_masks: torch.Tensor,
    batch_size: int,
    reduce: Callable[[torch.Tensor, slice], torch.Tensor],
    logits_to_keep: int | torch.Tensor = 0,
    cache: LayerInputCache | None = None,
    trim_padding: bool = True,
    past_for: PastFor | None = None,
) -> torch.Tensor:
    """Run ``input_ids`` (``[rows, pos]``) with one mask per row, in batches.

    ``reduce(logits [batch, pos, vocab], rows)`` turns each batch's logits into a small
    per-row tensor; only those are kept, so memory does not grow with the vocabulary.
    ``logits_to_keep`` is passed to the model (compute the LM head at the last positions only).
    With ``cache`` (built on the first ``cache.built_rows`` rows, which the rest repeat mask
    after mask), each batch starts at the deepest cached layer before its first pruned layer.
    With ``trim_padding``, columns that are padding in every row of a batch are not computed
    (inputs are left-padded to one width for all rows; a batch of short prompts needs less),
    so ``reduce`` sees logits for the batch's own width, aligned at the right.
    ``past_for(rows)`` gives each batch cached earlier tokens (a shared prefix).
    """
    base_rows = torch.arange(input_ids.shape[0]) % cache.built_rows if cache is not None else None
    outs = []
    for rows in row_batches(input_ids.shape[0], batch_size):
        masker.set(row_masks[rows])
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        ids, attn = input_ids[rows], attention_mask[rows]
        if trim_padding:
            ids, attn = trim_left_padding(ids, attn)
        past, past_attn = past_for(rows) if past_for else (None, None)
        start = cache.start_layer(first_pruned_layer(row_masks[rows])) if cache is not None else 0
        with cache.skip_to(start, base_rows[rows], ids.shape[1]) if start else nullcontext():
            out, _ = forward_rows(model, ids, attn, trim=False, past=past, past_attn=past_attn, **kwargs)
        outs.append(reduce(out.logits.float(), rows).cpu())
    masker.set(None)
    return torch.cat(outs)


class ReusesLayers:
    """Mixin of forward-only measures: a :class:`LayerInputCache` for their fixed inputs.

    Subclasses set ``reuse_layers``, ``cache_mb`` and ``batch_size`` in ``__init__``,
    ``model_`` and ``layout_`` in ``prepare``, and return their fixed ``(input_ids,
    attention_mask)`` from :meth:`fixed_inputs`. The cache is built on the first ``score``
    call (it needs the masker, to run with every head active).
    """

    cache_: LayerInputCache | None = None

    def fixed_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` that every mask is evaluated on."""
        raise NotImplementedError

    def release(self) -> None:
        self.cache_ = None

    def layer_cache(self, masker: HeadMasker) -> LayerInputCache | None:
        """The cache of this measure's inputs (built once), or None when reuse is off."""
        if not self.reuse_layers:
            return None
        if self.cache_ is None:
            self.cache_ = LayerInputCache(self.layout_, int(self.cache_mb * 2**20)).build(
                self.model_, masker, *self.fixed_inputs(), self.batch_size)
        return self.cache_
