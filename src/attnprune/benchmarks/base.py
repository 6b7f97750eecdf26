"""The measurement plug-in interface: cards, the registry, and the batched masked forward.

A measure is one class registered by name with :func:`register`. It is constructed with its
options, ``prepare(loaded)`` tokenises its inputs once for a loaded model, and
``score(masker, masks)`` returns one result per mask, running all masks through the model
together (each batch row carries its own mask).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch

from attnprune.errors import UserError
from attnprune.heads import HeadMask, HeadMasker


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
) -> torch.Tensor:
    """Run ``input_ids`` (``[rows, pos]``) with one mask per row, in batches.

    ``reduce(logits [batch, pos, vocab], rows)`` turns each batch's logits into a small
    per-row tensor; only those are kept, so memory does not grow with the vocabulary.
    ``logits_to_keep`` is passed to the model (compute the LM head at the last positions only).
    """
    device = next(model.parameters()).device
    outs = []
    for rows in row_batches(input_ids.shape[0], batch_size):
        masker.set(row_masks[rows])
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        attn = attention_mask[rows]
        # Explicit positions: with left padding, each row's first real token is position 0.
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=input_ids[rows].to(device),
            attention_mask=attn.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            **kwargs,
        )
        outs.append(reduce(out.logits.float(), rows).cpu())
    masker.set(None)
    return torch.cat(outs)
