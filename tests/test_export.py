"""A repaired checkpoint loads with plain transformers and equals the masked model."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from attnprune import HeadMask, apply_mask, head_layout
from attnprune.export import MASK_FILE, export_repaired
from attnprune.machine import code_version
from conftest import tiny_model, token_batch


def test_export_round_trip_every_architecture(arch, tmp_path):
    model = tiny_model(arch)
    layout = head_layout(model)
    mask = HeadMask.from_pruned(3, 4, [(0, 0), (1, 3), (2, 1), (2, 2)])
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
        with apply_mask(model, layout, mask):
            masked = model(ids).logits
    out = export_repaired(model, None, layout, mask, tmp_path / "repaired", model_name=f"tiny-{arch}")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before), "export changed the in-memory model"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        exported = loaded(ids).logits
    assert (exported - masked).abs().max().item() <= 1e-5
    assert loaded.config.attnprune["mask"]["pruned"] == [[0, 0], [1, 3], [2, 1], [2, 2]]
    record = json.loads((out / MASK_FILE).read_text())
    assert record["mask"]["model"] == f"tiny-{arch}"
    assert record["provenance"]["base_model"] == f"tiny-{arch}"
    assert record["provenance"]["attnprune_code"] == code_version()  # the commit, when run from a checkout
    assert not (tmp_path / "repaired.partial").exists()


def test_exported_model_needs_no_attnprune(tmp_path):
    model = tiny_model("llama")
    layout = head_layout(model)
    mask = HeadMask.from_pruned(3, 4, [(1, 1)])
    ids = token_batch(batch=1)
    with torch.no_grad(), apply_mask(model, layout, mask):
        expected = model(ids).logits
    out = export_repaired(model, None, layout, mask, tmp_path / "r")
    torch.save({"ids": ids, "expected": expected}, tmp_path / "io.pt")
    code = f"""
import sys, torch
sys.modules['attnprune'] = None  # any import of attnprune would now fail
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
io = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    d = (m(io['ids']).logits - io['expected']).abs().max().item()
assert d <= 1e-5, d
print('ok', d)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok")
