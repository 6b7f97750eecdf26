"""Head masking is exact, per-example, and refuses bad masks; covers every architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnprune import HeadMask, HeadMasker, MaskError, apply_mask, head_layout
from attnprune.models.layouts import projection_input_axis
from conftest import tiny_model, token_batch


def logits(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask).logits


def zero_head_in_weights(model, layout, pruned):
    """Reference: remove heads by zeroing their input columns of the output projection."""
    d = layout.head_dim
    with torch.no_grad():
        for layer, head in pruned:
            w = layout.out_projs[layer].weight
            if projection_input_axis(layout.out_projs[layer]) == 1:
                w[:, head * d:(head + 1) * d] = 0
            else:
                w[head * d:(head + 1) * d, :] = 0


EXPECTED_KV = {"llama": 2, "mistral": 2, "qwen2": 2, "phi3": 2, "gemma3": 1}


def test_layout_of_every_architecture(arch):
    layout = head_layout(tiny_model(arch))
    assert layout.shape == (3, 4)
    assert layout.n_kv_heads == EXPECTED_KV.get(arch, 4)
    assert layout.head_dim == (16 if arch == "gemma3" else 8)
    assert len(layout.out_projs) == 3


def test_all_active_mask_is_bitwise_identical(arch):
    model = tiny_model(arch)
    layout = head_layout(model)
    ids = token_batch()
    ref = logits(model, ids)
    with apply_mask(model, layout, HeadMask.all_active(*layout.shape)):
        same = logits(model, ids)
    with apply_mask(model, layout, torch.ones(2, *layout.shape)):
        same_batch = logits(model, ids[:2])
    assert torch.equal(ref, same)
    assert torch.equal(ref[:2], same_batch)


def test_mask_equals_zeroed_weights(arch):
    model = tiny_model(arch)
    layout = head_layout(model)
    pruned = [(0, 1), (1, 0), (1, 3), (2, 2)]
    ids = token_batch()
    with apply_mask(model, layout, HeadMask.from_pruned(3, 4, pruned)):
        masked = logits(model, ids)
    unmasked = logits(model, ids)
    zero_head_in_weights(model, layout, pruned)
    reference = logits(model, ids)
    assert (masked - reference).abs().max().item() <= 1e-5
    assert (masked - unmasked).abs().max().item() > 1e-3


def test_masking_any_single_head_changes_logits(arch):
    model = tiny_model(arch)
    layout = head_layout(model)
    ids = token_batch()
    ref = logits(model, ids)
    with HeadMasker(model, layout) as masker:
        for layer in range(3):
            for head in range(4):
                masker.set(HeadMask.from_pruned(3, 4, [(layer, head)]))
                diff = (logits(model, ids) - ref).abs().max().item()
                assert diff > 1e-4, f"masking head ({layer}, {head}) changed nothing"
    assert torch.equal(logits(model, ids), ref), "hooks were not removed"


def test_per_example_masks_equal_each_mask_alone(arch):
    model = tiny_model(arch)
    layout = head_layout(model)
    rng = np.random.default_rng(0)
    masks = [HeadMask(rng.random((3, 4)) > 0.3) for _ in range(4)]
    ids = token_batch(batch=1).repeat(4, 1)
    batch = torch.stack([m.tensor() for m in masks])
    with apply_mask(model, layout, batch):
        together = logits(model, ids)
    for i, m in enumerate(masks):
        with apply_mask(model, layout, m):
            alone = logits(model, ids[:1])
        assert (together[i] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch_impl", [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa")])
def test_padding_and_attention_implementations(arch_impl):
    arch, impl = arch_impl
    model = tiny_model(arch, attn_implementation=impl)
    layout = head_layout(model)
    ids = token_batch(batch=2, length=8)
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding in row 1
    masks = torch.stack([HeadMask.from_pruned(3, 4, [(0, 0), (2, 1)]).tensor(), HeadMask.from_pruned(3, 4, [(1, 2)]).tensor()])
    with apply_mask(model, layout, masks):
        together = logits(model, ids, attn)
    for row in range(2):
        with apply_mask(model, layout, masks[row]):
            alone = logits(model, ids[row:row + 1], attn[row:row + 1])
        keep = attn[row].bool()
        assert (together[row][keep] - alone[0][keep]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_generate_with_mask_matches_zeroed_weights(arch):
    model = tiny_model(arch)
    layout = head_layout(model)
    pruned = [(0, 2), (2, 0)]
    ids = token_batch(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with apply_mask(model, layout, HeadMask.from_pruned(3, 4, pruned)):
        masked = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    zero_head_in_weights(model, layout, pruned)
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(masked, reference)


def test_hooks_removed_after_exception():
    model = tiny_model("llama")
    layout = head_layout(model)
    with pytest.raises(RuntimeError):
        with apply_mask(model, layout, HeadMask.from_pruned(3, 4, [(0, 0)])):
            raise RuntimeError("boom")
    assert all(not p._forward_pre_hooks for p in layout.out_projs)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.ones(3, 5), "shape"),
        (torch.ones(2, 4), "shape"),
        (torch.ones(3, 4) * 0.5, r"0 \(pruned\) and 1"),
        (torch.ones(2, 2, 3, 4), "shape"),
    ],
)
def test_bad_masks_are_refused_with_a_clear_error(bad, message):
    model = tiny_model("llama")
    layout = head_layout(model)
    with pytest.raises(MaskError, match=message):
        with apply_mask(model, layout, bad):
            pass


def test_mask_batch_must_match_forward_batch():
    model = tiny_model("llama")
    layout = head_layout(model)
    with pytest.raises(MaskError, match="one mask per batch row"):
        with apply_mask(model, layout, torch.zeros(2, 3, 4)):
            logits(model, token_batch(batch=3))


def test_mask_json_round_trip_and_validation(tmp_path):
    layout = head_layout(tiny_model("llama"))
    mask = HeadMask.from_pruned(3, 4, [(2, 3), (0, 1)])
    path = mask.save(tmp_path / "m.json", model="tiny-llama", note="x")
    assert HeadMask.load(path, layout) == mask
    assert mask.pruned == [(0, 1), (2, 3)]
    assert HeadMask.from_key(mask.key, 3, 4) == mask
    assert HeadMask.from_bits(mask.bits, 3, 4) == mask
    other = HeadMask.from_pruned(5, 4, [(4, 0)]).save(tmp_path / "o.json", model="other")
    with pytest.raises(MaskError, match="this model has 3 x 4"):
        HeadMask.load(other, layout)
    (tmp_path / "bad.json").write_text('{"layers": 3, "heads": 4, "pruned": [[7, 0]]}')
    with pytest.raises(MaskError, match="outside"):
        HeadMask.load(tmp_path / "bad.json", layout)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(MaskError, match="not valid JSON"):
        HeadMask.load(tmp_path / "junk.json", layout)
