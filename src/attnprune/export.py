"""Export of a repaired model as a standard Hugging Face checkpoint.

The mask is baked into the weights: the pruned heads' slices of the attention output
projection's *input* dimension are zeroed. That is exact (the same arithmetic as the
masking hook: a zero input slice and a zero weight slice both remove the head's
contribution), works for every architecture and keeps the config unchanged, so the
checkpoint loads with plain ``transformers`` and no attnprune import. The mask and its
provenance are recorded in ``config.json`` (key ``attnprune``) and in
``attnprune_mask.json`` beside it.

Physically removing heads is not offered: transformers 5 configs cannot express a
different head count per layer for modern architectures, and zeroed weights give the
same outputs.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

import torch

from attnprune import __version__
from attnprune.errors import UserError
from attnprune.heads import HeadMask
from attnprune.models.layouts import HeadLayout, projection_input_axis

MASK_FILE = "attnprune_mask.json"


@torch.no_grad()
def bake_mask(layout: HeadLayout, mask: HeadMask) -> list[tuple[torch.nn.Parameter, tuple, torch.Tensor]]:
    """Zero the pruned heads' input slices of the output projections in place.

    Returns ``(weight, index, original values)`` triples so that :func:`unbake` can undo it.
    """
    saved = []
    d = layout.head_dim
    for layer, head in mask.pruned:
        proj = layout.out_projs[layer]
        axis = projection_input_axis(proj)
        sl = [slice(None)] * 2
        sl[axis] = slice(head * d, (head + 1) * d)
        saved.append((proj.weight, tuple(sl), proj.weight[tuple(sl)].clone()))
        proj.weight[tuple(sl)] = 0
    return saved


@torch.no_grad()
def unbake(saved) -> None:
    """Restore the weights changed by :func:`bake_mask`."""
    for weight, sl, values in reversed(saved):
        weight[sl] = values


def export_repaired(
    model: torch.nn.Module,
    tokenizer,
    layout: HeadLayout,
    mask: HeadMask,
    out_dir: str | Path,
    model_name: str | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write ``model`` with ``mask`` baked in to ``out_dir`` (safetensors, config, tokenizer).

    The in-memory model is left unchanged. The directory is written to a temporary sibling
    and renamed, so an interrupted export never leaves a half-written checkpoint.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MASK_FILE).is_file())):
        raise UserError(f"{out_dir} exists and is not an attnprune export; choose a new output directory "
                        "(an earlier export there would be replaced).")
    record = {
        "mask": mask.to_dict(model_name),
        "provenance": {
            "attnprune_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": model_name,
            "method": "zeroed output-projection input slices (exact head removal)",
            **(provenance or {}),
        },
    }
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    saved = bake_mask(layout, mask)
    had_attr = hasattr(model.config, "attnprune")
    try:
        model.config.attnprune = record
        model.save_pretrained(tmp)
    finally:
        unbake(saved)
        if not had_attr:
            del model.config.attnprune
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / MASK_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
