"""Architecture coverage: every causal LM of the installed transformers is exact, refused in one sentence, or
not buildable as a tiny random model; none is ever masked wrongly. Also the load-time self-check and the
export's equality check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from attnprune.errors import ModelLoadError, UserError
from attnprune.heads import HeadMask, check_masking
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
    ("laguna", "different widths (layer 0: 64, layer 1: 128 inputs)"),   # per-layer head counts
    ("gemma4_text", "different widths (layer 0: 64, layer 1: 128 inputs)"),  # per-layer head widths
    ("qwen3_next", "is a hybrid: 1 of its 4 layers have attention"),
])
def test_architectures_that_would_be_wrong_are_refused_in_one_sentence(model_type, phrase):
    row = survey.survey_one(model_type)
    assert row["group"] == "refused" and phrase in row["reason"], row
    assert len(row["reason"].splitlines()) == 1


def test_a_hybrid_layer_without_attention_is_named():
    model = tiny_model("llama")
    del model.model.layers[1].self_attn
    with pytest.raises(ModelLoadError, match="is a hybrid: 2 of its 3 layers have attention"):
        head_layout(model)


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
