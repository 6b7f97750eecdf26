"""Token rows and the forward-time machinery under the :class:`~attnprune.backend.Backend`.

- :class:`TokenRows`: fixed token sequences scored under every mask (sorted by length,
  left-padded once), with what the backend computed for them with every head active;
- :class:`PrefixSplit`: those sequences cut into their group's shared prefix and their suffix;
- :class:`LayerInputCache`: the unrepaired model's hidden states entering decoder layers,
  so that a masked forward can start at its first pruned layer;
- the low-level helpers of a masked forward (padding, row batches, one mask per row, KV
  caches), shared by the backend's operations.

None of them changes a number: they are the backend's speed-ups, kept apart so that
:mod:`attnprune.backend` holds the operations a measure calls.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from attnprune.heads import HeadMask, HeadMasker
from attnprune.models.layouts import HeadLayout

# (logits at the last position [batch, vocab]) -> one value per row [batch]
LastReduce = Callable[[torch.Tensor], torch.Tensor]
# (rows of the forward) -> (their KV cache of earlier tokens, its [rows, P] padding mask)
PastFor = Callable[[slice], tuple[object, torch.Tensor]]

# ---------------------------------------------------------------------------------------
# low-level helpers
# ---------------------------------------------------------------------------------------


def left_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``, each sequence right-aligned in a row of the longest's width."""
    width = max(len(e) for e in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, e in enumerate(seqs):
        ids[row, width - len(e):] = torch.tensor(list(e), dtype=torch.long)
        attn[row, width - len(e):] = 1
    return ids, attn


def trim_left_padding(ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (left-padded batches)."""
    real = torch.nonzero(attn.any(dim=0))
    first = int(real[0]) if len(real) else 0
    return ids[:, first:], attn[:, first:]


def row_batches(n_rows: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``batch_size`` rows."""
    for start in range(0, n_rows, batch_size):
        yield slice(start, min(start + batch_size, n_rows))


def mask_rows(masks: Sequence[HeadMask], rows_per_mask: int) -> torch.Tensor:
    """``[n_masks * rows_per_mask, L, H]``: each mask repeated for its rows (mask-major)."""
    stacked = torch.stack([m.tensor() for m in masks])
    return stacked.repeat_interleave(rows_per_mask, dim=0)


def cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (under either name)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


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


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer is called with (first positional or ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]


# ---------------------------------------------------------------------------------------
# layer reuse
# ---------------------------------------------------------------------------------------


def select_rows(past, rows: torch.Tensor):
    """A cache holding rows ``rows`` of ``past``'s keys and values; ``past`` is left unchanged.

    What ``deepcopy`` + ``reorder_cache`` give, without copying every row first: with
    thousands of prompts the deep copy of all prefixes for every batch dominated the time.
    """
    selected = copy.copy(past)
    selected.layers = []
    for layer in past.layers:
        new = copy.copy(layer)
        if layer.get_seq_length() > 0:
            new.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            new.values = layer.values.index_select(0, rows.to(layer.values.device))
        selected.layers.append(new)
    return selected


class LayerInputCache:
    """Hidden states entering chosen decoder layers, for fixed inputs, all heads active.

    A head mask only acts from its first layer with a pruned head on; every layer before it
    computes exactly what the unrepaired model computes. The cache is bounded by
    ``max_bytes``: when all layers do not fit, evenly spaced layers are kept. It works on
    any architecture whose decoder loop passes each layer's output straight to the next
    (all those in :data:`attnprune.models.layouts.ADAPTERS`; the tests check all of them).
    """

    def __init__(self, layout: HeadLayout, max_bytes: int = 1 << 30):
        self.layout = layout
        self.max_bytes = max_bytes
        self.inputs: dict[int, torch.Tensor] = {}  # layer -> [rows, pos, hidden]
        self.output_arity: dict[int, int | None] = {}  # per model layer; None: returns a tensor, n: a tuple of n
        self.built_rows = 0

    @property
    def layers(self) -> list[int]:
        """The cached layers, ascending."""
        return sorted(self.inputs)

    def nbytes(self) -> int:
        """Memory held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.inputs.values())

    def choose_layers(self, bytes_per_layer: int) -> list[int]:
        """Model layers 1..L-1 when they fit in ``max_bytes``, else an evenly spaced subset (attention layers first).

        In a hybrid only the inputs of attention layers can be a start (a mask acts there), so
        those are the candidates.
        """
        if self.layout.is_hybrid:
            starts = [l for l in self.layout.layer_ids if l > 0]
            fit = min(len(starts), self.max_bytes // max(1, bytes_per_layer))
            if fit <= 0:
                return []
            return sorted({starts[min(len(starts) - 1, int(i * len(starts) / fit))] for i in range(fit)})
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
        self.built_rows = input_ids.shape[0]  # with no layer (none fits the memory) every forward runs every layer
        if not wanted:
            return self
        parts: dict[int, list[torch.Tensor]] = {l: [] for l in wanted}
        widths: list[int] = []
        arity: dict[int, int | None] = {}

        def capture(layer: int):
            def pre_hook(module, args, kwargs):
                parts[layer].append(_hidden_arg(args, kwargs).detach().clone())
            return pre_hook

        def record_output(layer: int):  # per layer: a hybrid's layer kinds may return different tuples
            def hook(module, args, kwargs, output):
                arity.setdefault(layer, len(output) if isinstance(output, tuple) else None)
            return hook

        modules = self.layout.layer_modules
        handles = [modules[l].register_forward_pre_hook(capture(l), with_kwargs=True) for l in wanted]
        handles += [modules[l].register_forward_hook(record_output(l), with_kwargs=True)
                    for l in range(max(wanted))]
        try:
            masker.set(None)
            for rows in row_batches(input_ids.shape[0], batch_size):
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
        self.output_arity = arity
        return self

    def start_layer(self, first_pruned: int) -> int:
        """Deepest cached model layer at or before mask row ``first_pruned``'s layer (0: run every layer)."""
        limit = self.layout.model_layer(first_pruned)
        usable = [l for l in self.inputs if l <= limit]
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

        def skipped(arity: int | None):
            def forward(*args, **kwargs):
                return cached if arity is None else (cached, *([None] * (arity - 1)))
            return forward

        modules = self.layout.layer_modules[:start]
        # An instance attribute shadows the class's forward; one set before us (accelerate's
        # device hooks under device_map) is put back afterwards.
        saved = [m.__dict__.get("forward") for m in modules]
        for i, m in enumerate(modules):
            m.forward = skipped(self.output_arity.get(i))
        try:
            yield
        finally:
            for m, old in zip(modules, saved):
                if old is None:
                    del m.forward
                else:
                    m.forward = old


# ---------------------------------------------------------------------------------------
# the inputs of a measure
# ---------------------------------------------------------------------------------------


class PrefixSplit:
    """Sequences cut into their group's shared token prefix and their own suffix.

    The prefix of a group is the longest token prefix common to all its sequences (at most
    all but one token of the shortest); a group whose sequences share no token falls back to
    each sequence's first token. Every distinct prefix runs once per mask.
    """

    def __init__(self, seqs: Sequence[Sequence[int]], groups: Sequence[str], pad: int,
                 cut: Sequence[int] | None = None):
        if cut is None:
            members: dict[str, list[int]] = {}
            for i, g in enumerate(groups):
                members.setdefault(g, []).append(i)
            cut = [0] * len(seqs)
            for idx in members.values():
                group = [seqs[i] for i in idx]
                c = 0
                while c < min(len(e) for e in group) - 1 and all(e[c] == group[0][c] for e in group):
                    c += 1
                for i in idx:
                    cut[i] = max(c, 1)
        self.cut = list(cut)  # each sequence's prefix length, in the caller's order
        prefixes = sorted({tuple(seqs[i][:cut[i]]) for i in range(len(seqs))})
        index = {p: g for g, p in enumerate(prefixes)}
        self.prefix_ids, self.prefix_attn = left_padded([list(p) for p in prefixes], pad)
        suffixes = [list(seqs[i][cut[i]:]) for i in range(len(seqs))]
        self.order = np.argsort([len(e) for e in suffixes], kind="stable")
        self.ids, self.attn = left_padded([suffixes[i] for i in self.order], pad)
        self.group = torch.tensor([index[tuple(seqs[i][:cut[i]])] for i in self.order])
        self.tokens = int(self.prefix_attn.sum() + self.attn.sum())


class TokenRows:
    """Fixed token sequences scored under every mask: sorted by length, left-padded, once.

    Also holds what the backend computed for them with every head active (layer inputs,
    prefix keys/values, the decision whether sharing prefixes is exact); :meth:`release`
    drops those, and they are rebuilt on the next use.
    """

    def __init__(self, seqs: Sequence[Sequence[int]], pad: int, groups: Sequence[str] | None = None,
                 cut: Sequence[int] | None = None):
        if not seqs or min(len(s) for s in seqs) < 1:
            raise ValueError("every sequence needs at least one token")
        self.n = len(seqs)
        self.pad = pad
        self.lengths = np.array([len(s) for s in seqs])
        self.order = np.argsort(self.lengths, kind="stable")
        self.ids, self.attn = left_padded([seqs[i] for i in self.order], pad)
        self.tokens = int(self.attn.sum())
        self.split = PrefixSplit(seqs, groups, pad, cut) if groups is not None and self.lengths.min() >= 2 else None
        self.sharing: bool | None = None if self.split is not None else False
        self.layer_cache: LayerInputCache | None = None
        self.prefix_cache: LayerInputCache | None = None
        self.base_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.kv_reuse: bool | None = None

    @property
    def shared_tokens(self) -> int:
        """Tokens run per mask with shared prefixes (``tokens`` without)."""
        return self.split.tokens if self.sharing else self.tokens

    def release(self) -> None:
        """Drop the cached unrepaired computations."""
        self.layer_cache = self.prefix_cache = self.base_kv = None

    def sequence(self, i: int) -> list[int]:
        """The ``i``-th sequence as given (padding removed)."""
        k = int(np.flatnonzero(self.order == i)[0])
        return self.ids[k][self.attn[k].bool()].tolist()

    def probe(self) -> "TokenRows":
        """A few rows that exercise every prefix split: per prefix, its shortest, median and longest suffix.

        Cut exactly as in these rows, so shared prefixes that reproduce whole sequences on
        the probe do so here (the check that decides :attr:`sharing` runs on it). Returns
        ``self`` when the probe would not be smaller.
        """
        split = self.split
        picked: set[int] = set()
        for g in range(split.prefix_ids.shape[0]):
            members = np.flatnonzero(split.group.numpy() == g)  # positions in suffix-length order
            if len(members):
                picked.update(int(split.order[members[k]]) for k in (0, len(members) // 2, len(members) - 1))
        if len(picked) >= self.n:
            return self
        idx = sorted(picked)
        return TokenRows([self.sequence(i) for i in idx], self.pad, ["probe"] * len(idx), [split.cut[i] for i in idx])

    def unsort(self, flat: np.ndarray, n_masks: int, order: np.ndarray | None = None) -> np.ndarray:
        """``[n_masks, n]`` in the caller's sequence order from mask-major rows in sorted order."""
        order = self.order if order is None else order
        out = np.empty((n_masks, self.n), dtype=flat.dtype)
        out[:, order] = flat.reshape(n_masks, self.n)
        return out
