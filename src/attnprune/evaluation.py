"""The evaluator: masks in, (bias, perplexity) out - the only caller of the backend's model runs.

An :class:`Evaluator` holds one :class:`~attnprune.backend.Backend` (one loaded model, one
set of masking hooks) and the prepared inputs of a bias measure and of perplexity, on one
split. ``evaluate(masks)`` scores a list of masks (each forward batch row may carry its own
mask) and returns one :class:`Evaluation` per mask. Masks are swapped in the hook buffers;
the model is never reloaded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from attnprune.backend import Backend
from attnprune.heads import HeadMask, check_fits
from attnprune.measures import get_measure
from attnprune.results import BiasResult, EvaluatorSetup


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

    @property
    def bias_result(self) -> BiasResult:
        """:attr:`bias_detail`, typed."""
        return BiasResult.of(self.bias_detail)

    def to_dict(self) -> dict:
        """JSON-ready (mask as its pruned list)."""
        d = asdict(self)
        d["mask"] = {"pruned": [list(p) for p in self.mask.pruned], "n_pruned": self.mask.n_pruned}
        return d


class Evaluator:
    """Scores head masks on a loaded model: one bias measure + perplexity, on one split.

    ``backend_options`` are the backend's speed options (they never change a number, so
    they are not part of :meth:`describe`).
    """

    def __init__(self, loaded, bias: str = "likelihood", bias_options: dict | None = None,
                 perplexity_options: dict | None = None, split: str = "valid", backend_options: dict | None = None):
        self.loaded = loaded
        self.split = split
        self.backend = Backend(loaded, **(backend_options or {}))
        self.bias_measure = get_measure(bias, split=split, **(bias_options or {})).prepare(self.backend)
        self.ppl_measure = get_measure("perplexity", split=split, **(perplexity_options or {})).prepare(self.backend)
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

    def setup(self) -> EvaluatorSetup:
        """:meth:`describe`, typed."""
        return EvaluatorSetup.from_dict(self.describe())

    def evaluate(self, masks: Sequence[HeadMask] | HeadMask, with_perplexity: bool = True,
                 with_bias: bool = True) -> list[Evaluation]:
        """Score ``masks`` (one or many); results in the same order.

        A measure left out (``with_perplexity`` / ``with_bias`` False) reads NaN, with an empty detail.
        """
        if isinstance(masks, HeadMask):
            masks = [masks]
        masks = list(masks)
        for m in masks:
            check_fits(m, self.loaded.layout)
        start = time.perf_counter()
        nan = float("nan")
        bias = self.bias_measure.score(masks) if with_bias else [{"bias": nan, "ci": [nan, nan]}] * len(masks)
        ppl = self.ppl_measure.score(masks) if with_perplexity else [{"perplexity": nan}] * len(masks)
        seconds = (time.perf_counter() - start) / max(1, len(masks))
        self.calls += len(masks)
        return [
            Evaluation(mask=m, bias=b["bias"], bias_ci=b["ci"], perplexity=p["perplexity"],
                       bias_detail=b if with_bias else {}, perplexity_detail=p, seconds=seconds)
            for m, b, p in zip(masks, bias, ppl)
        ]

    @property
    def estimates_removals(self) -> bool:
        """Whether :meth:`removal_estimates` works here (a forward-only HolisticBias measure)."""
        return self.bias_measure.first_order and self.bias_measure.bucket_projection() is not None

    def removal_estimates(self) -> dict:
        """First-order estimates of removing each head (one forward and backward pass for all heads).

        ``{"summary": [L*H, B], "log_perplexity": [L*H]}``: the shift of the bias measure's
        bucket means and of the log-perplexity. Needs a forward-only HolisticBias measure.
        """
        from attnprune.errors import UserError

        if not self.estimates_removals:
            raise UserError(f"First-order screening needs the likelihood bias measure, not "
                            f"{self.bias_measure.card.name}; use --knockouts 1 (every head).")
        per_prompt = self.bias_measure.removal_estimates()  # [n, N]
        return {"summary": self.bias_measure.bucket_means(per_prompt.T),
                "log_perplexity": self.ppl_measure.removal_estimates()}

    def gate_gradients(self):
        """``[L, H]`` |d NLL / d gate| of every head on this evaluator's perplexity text (the gradient baseline)."""
        return self.ppl_measure.gate_gradients()

    def close(self) -> None:
        """Remove the masking hooks and drop the cached unrepaired computations."""
        self.backend.close()
