"""The evaluator: the only object that runs the LLM.

One :class:`Evaluator` holds one loaded model, its prepared (tokenised) inputs for a bias
measure and a perplexity benchmark, and one installed :class:`~attnprune.heads.HeadMasker`.
``evaluate(masks)`` scores a batch of masks (each batch row carries its own mask) and
returns one :class:`Evaluation` per mask. Masks are swapped in the hook buffers; the model
is never reloaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from attnprune.benchmarks import get_measure
from attnprune.errors import MaskError
from attnprune.heads import HeadMask, HeadMasker


@dataclass
class Evaluation:
    """Scores of one mask: bias (with CI), perplexity, and what they were measured on."""

    mask: HeadMask
    bias: float
    bias_ci: list[float]
    perplexity: float
    bias_detail: dict = field(default_factory=dict)
    perplexity_detail: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready (mask as its pruned list)."""
        d = asdict(self)
        d["mask"] = {"pruned": [list(p) for p in self.mask.pruned], "n_pruned": self.mask.n_pruned}
        return d


class Evaluator:
    """Scores head masks on a loaded model: one bias measure + perplexity, on one split."""

    def __init__(self, loaded, bias: str = "likelihood", bias_options: dict | None = None,
                 perplexity_options: dict | None = None, split: str = "valid"):
        self.loaded = loaded
        self.split = split
        self.bias_measure = get_measure(bias, split=split, **(bias_options or {})).prepare(loaded)
        self.ppl_measure = get_measure("perplexity", split=split, **(perplexity_options or {})).prepare(loaded)
        self.masker = HeadMasker(loaded.model, loaded.layout).install()
        self.calls = 0

    def describe(self) -> dict:
        """What every number from this evaluator is measured on."""
        return {
            "model": self.loaded.name,
            "split": self.split,
            "bias_measure": self.bias_measure.card.name,
            "bias_inputs": self.bias_measure.describe(),
            "perplexity_inputs": self.ppl_measure.describe(),
        }

    def evaluate(self, masks: Sequence[HeadMask] | HeadMask, with_perplexity: bool = True) -> list[Evaluation]:
        """Score ``masks`` (one or many); results in the same order."""
        if isinstance(masks, HeadMask):
            masks = [masks]
        masks = list(masks)
        for m in masks:
            if m.shape != self.loaded.layout.shape:
                raise MaskError(
                    f"The mask has shape {m.shape} but the model has {self.loaded.layout.shape} heads; "
                    "use a mask made for this model."
                )
        start = time.perf_counter()
        bias = self.bias_measure.score(self.masker, masks)
        ppl = self.ppl_measure.score(self.masker, masks) if with_perplexity else [{"perplexity": float("nan")}] * len(masks)
        seconds = (time.perf_counter() - start) / max(1, len(masks))
        self.calls += len(masks)
        return [
            Evaluation(mask=m, bias=b["bias"], bias_ci=b["ci"], perplexity=p["perplexity"], bias_detail=b,
                       perplexity_detail=p, seconds=seconds)
            for m, b, p in zip(masks, bias, ppl)
        ]

    def close(self) -> None:
        """Remove the masking hooks and drop the measures' caches."""
        self.masker.remove()
        self.bias_measure.release()
        self.ppl_measure.release()
