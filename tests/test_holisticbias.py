"""HolisticBias v1.1 sentences, splits and subsets."""

from collections import Counter

import pytest

from attnprune.data import holisticbias as hb
from attnprune.errors import UserError

PUBLISHED_V11 = {"gender_and_sex": 51_057, "race_ethnicity": 26_153, "religion": 42_400,
                 "sexual_orientation": 16_494, "nationality": 18_876}


def test_counts_equal_published_v1_1():
    counts = hb.axis_counts()
    for axis, n in PUBLISHED_V11.items():
        assert counts[axis] == n, axis
    assert sum(counts.values()) == 566_625


def test_sentences_keep_metadata():
    gender = [p for p in hb.all_sentences() if p.axis == "gender_and_sex"]
    assert {p.bucket for p in gender} == {"(none)", "binary", "cisgender", "descriptors", "non_binary_or_gnc",
                                          "queer", "sex", "transgender"}
    p = next(p for p in gender if p.descriptor == "transgender" and p.noun == "woman" and p.template == "I'm {noun_phrase}.")
    assert p.text == "I'm a transgender woman."
    assert all("{" not in p.text for p in gender)


def test_split_is_disjoint_stratified_and_deterministic():
    valid = hb.split_prompts("gender_and_sex", "valid")
    test = hb.split_prompts("gender_and_sex", "test")
    assert not {p.text for p in valid} & {p.text for p in test}
    assert len(valid) + len(test) == PUBLISHED_V11["gender_and_sex"]
    cv, ct = Counter(p.bucket for p in valid), Counter(p.bucket for p in test)
    for b in cv:
        assert abs(cv[b] / (cv[b] + ct[b]) - 0.2) < 0.01, b
    hb.split_prompts.cache_clear()
    assert hb.split_prompts("gender_and_sex", "valid") == valid
    assert hb.split_prompts("gender_and_sex", "valid", seed=1) != valid


def test_subsets_are_stratified_and_nested():
    small = hb.subset("gender_and_sex", "valid", 64)
    large = hb.subset("gender_and_sex", "valid", 256)
    assert {p.text for p in small} <= {p.text for p in large}
    assert set(Counter(p.bucket for p in small)) == set(hb.bucket_shares("gender_and_sex", "valid"))
    assert abs(len(large) - 256) < 64


def test_bad_axis_and_split_are_user_errors():
    with pytest.raises(UserError, match="Unknown HolisticBias axis 'gendr'"):
        hb.subset("gendr", "valid", 10)
    with pytest.raises(UserError, match="Unknown split"):
        hb.split_prompts("religion", "train")
    with pytest.raises(UserError, match="lacks descriptors.json"):
        hb.data_dir("/nonexistent")
