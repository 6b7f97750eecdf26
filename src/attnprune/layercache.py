"""Reuse of the work a head mask cannot change: inputs of the layers before the first pruned one.

A head mask only acts from its first layer with a pruned head on; every layer before it
computes exactly what the unrepaired model computes. For the fixed inputs of a measure
(HolisticBias prompts, perplexity windows) :class:`LayerInputCache` runs the unrepaired
model once and keeps the hidden state that enters selected decoder layers. A masked
forward then starts at the deepest cached layer at or before the first pruned layer: the
layers before it are skipped (their ``forward`` is replaced, for that call only, by one
that returns the cached input of the start layer), the embedding, the attention-mask
construction, the remaining layers, the final norm and the LM head run as usual.

This works on any architecture whose decoder loop passes each layer's output straight to
the next layer (all those in :data:`attnprune.models.layouts.ADAPTERS`); the tests check
equality with the full forward on every one of them. The cache is bounded by
``max_bytes``: when all layers do not fit, evenly spaced layers are kept.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from attnprune.heads import HeadMasker
from attnprune.models.layouts import HeadLayout


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer is called with (first positional or ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


def trim_left_padding(ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (left-padded batches)."""
    real = torch.nonzero(attn.any(dim=0))
    first = int(real[0]) if len(real) else 0
    return ids[:, first:], attn[:, first:]


def cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (under either name)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


# (rows of the forward) -> (their KV cache of earlier tokens, its [rows, P] padding mask)
PastFor = Callable[[slice], tuple[object, torch.Tensor]]


def forward_rows(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, trim: bool = True,
                 past=None, past_attn: torch.Tensor | None = None, use_cache: bool = False, **kwargs):
    """One forward of left-padded rows; returns ``(output, width)``.

    ``trim`` drops columns that are padding in every row. ``past`` (a transformers cache with
    ``past_attn``, its ``[rows, P]`` padding mask) continues earlier tokens: positions go on
    from each row's number of real past tokens. Positions are explicit, so with left padding
    every row's first real token is position 0.
    """
    if trim:
        ids, attn = trim_left_padding(ids, attn)
    positions = attn.cumsum(-1) - 1
    if past is not None:
        positions = positions + past_attn.sum(-1, keepdim=True)
        attn = torch.cat([past_attn, attn], dim=-1)
        kwargs[cache_argument(model)] = past
        use_cache = True
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                position_ids=positions.clamp(min=0).to(device), use_cache=use_cache, **kwargs)
    return out, ids.shape[1]


def first_pruned_layer(row_masks: torch.Tensor) -> int:
    """Lowest layer with a pruned head in any of ``row_masks`` (``[rows, L, H]``); ``L`` if none."""
    pruned_layers = (row_masks < 1).any(dim=-1).any(dim=0)  # [L]
    hits = torch.nonzero(pruned_layers)
    return int(hits[0]) if len(hits) else row_masks.shape[1]


class LayerInputCache:
    """Hidden states entering chosen decoder layers, for fixed inputs, all heads active."""

    def __init__(self, layout: HeadLayout, max_bytes: int = 1 << 30):
        self.layout = layout
        self.max_bytes = max_bytes
        self.inputs: dict[int, torch.Tensor] = {}  # layer -> [rows, pos, hidden]
        self.output_arity: int | None = None  # None: layers return a tensor; n: a tuple of n
        self.built_rows = 0

    @property
    def layers(self) -> list[int]:
        """The cached layers, ascending."""
        return sorted(self.inputs)

    def nbytes(self) -> int:
        """Memory held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.inputs.values())

    def choose_layers(self, bytes_per_layer: int) -> list[int]:
        """Layers 1..L-1 when they fit in ``max_bytes``, else an evenly spaced subset."""
        n_layers = self.layout.n_layers
        fit = min(n_layers - 1, self.max_bytes // max(1, bytes_per_layer))
        if fit <= 0:
            return []
        if fit >= n_layers - 1:
            return list(range(1, n_layers))
        step = n_layers / (fit + 1)
        return sorted({max(1, min(n_layers - 1, round(step * (i + 1)))) for i in range(fit)})

    @torch.no_grad()
    def build(self, model: torch.nn.Module, masker: HeadMasker, input_ids: torch.Tensor,
              attention_mask: torch.Tensor, batch_size: int, layers: list[int] | None = None,
              past_for: PastFor | None = None, trim: bool = True) -> "LayerInputCache":
        """Run the unrepaired model over ``input_ids`` (``[rows, pos]``) and keep the layer inputs.

        ``layers`` fixes the cached layers (default: as many as ``max_bytes`` allows);
        ``past_for(rows)`` gives the rows' cached earlier tokens, as in the scoring.
        """
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd")
        dtype = next(model.parameters()).dtype
        per_layer = input_ids.numel() * hidden * torch.empty((), dtype=dtype).element_size()
        wanted = self.choose_layers(per_layer) if layers is None else sorted(layers)
        self.inputs = {}
        if not wanted:
            return self
        parts: dict[int, list[torch.Tensor]] = {l: [] for l in wanted}
        widths: list[int] = []
        arity: list[int | None] = []

        def capture(layer: int):
            def pre_hook(module, args, kwargs):
                parts[layer].append(_hidden_arg(args, kwargs).detach().clone())
            return pre_hook

        def record_output(module, args, kwargs, output):
            arity.append(len(output) if isinstance(output, tuple) else None)

        modules = self.layout.layer_modules
        handles = [modules[l].register_forward_pre_hook(capture(l), with_kwargs=True) for l in wanted]
        handles.append(modules[0].register_forward_hook(record_output, with_kwargs=True))
        try:
            masker.set(None)
            for start in range(0, input_ids.shape[0], batch_size):
                rows = slice(start, min(start + batch_size, input_ids.shape[0]))
                past, past_attn = past_for(rows) if past_for else (None, None)
                _, width = forward_rows(model, input_ids[rows], attention_mask[rows], trim=trim, past=past,
                                        past_attn=past_attn, logits_to_keep=1)
                widths.append(width)
        finally:
            for h in handles:
                h.remove()
        # batches were computed at their own width: pad back on the left (padding positions are
        # masked out; zeros keep them finite) so that every row has the full width
        full = input_ids.shape[1]
        self.inputs = {l: torch.cat([F.pad(t, (0, 0, full - w, 0)) for t, w in zip(p, widths)]) for l, p in parts.items()}
        self.output_arity = arity[0] if arity else None
        self.built_rows = input_ids.shape[0]
        return self

    def start_layer(self, first_pruned: int) -> int:
        """Deepest cached layer at or before ``first_pruned`` (0: run every layer)."""
        usable = [l for l in self.inputs if l <= first_pruned]
        return max(usable) if usable else 0

    @contextmanager
    def skip_to(self, start: int, base_rows: torch.Tensor, width: int | None = None) -> Iterator[None]:
        """Within the block, layers before ``start`` return the cached input of ``start``.

        ``base_rows`` are the rows of the cached inputs that make up the forward batch, and
        ``width`` its number of (rightmost) positions when leading padding was trimmed.
        """
        if start <= 0:
            yield
            return
        cached = self.inputs[start][base_rows]
        if width is not None:
            cached = cached[:, cached.shape[1] - width:]
        arity = self.output_arity

        def skipped(*args, **kwargs):
            return cached if arity is None else (cached, *([None] * (arity - 1)))

        modules = self.layout.layer_modules[:start]
        # An instance attribute shadows the class's forward; one set before us (accelerate's
        # device hooks under device_map) is put back afterwards.
        saved = [m.__dict__.get("forward") for m in modules]
        for m in modules:
            m.forward = skipped
        try:
            yield
        finally:
            for m, old in zip(modules, saved):
                if old is None:
                    del m.forward
                else:
                    m.forward = old
