"""The one place that runs the model under head masks.

A measure hands its fixed token sequences to the :class:`Backend` once
(:meth:`Backend.rows`) and asks, for a list of masks, for what it reads from the model:

- :meth:`Backend.last_position`: a reduction of the logits at each sequence's last token
  (the likelihood measure's next-token log-odds);
- :meth:`Backend.sequence_nll`: per-sequence sums of token negative log-likelihoods
  (perplexity windows, CrowS-Pairs and StereoSet sentences);
- :meth:`Backend.sample`: sampled continuations with common random numbers (toxicity);
- :meth:`Backend.gate_gradients`: gradients of the NLL with respect to per-head gates.

Every mask in a call runs on the same inputs; rows of a forward batch may carry different
masks (``[rows, L, H]`` through :class:`~attnprune.heads.HeadMasker`). Speed-ups that
never change a number live here, for every measure alike:

- **trimmed padding**: sequences are sorted by length and left-padded; columns that are
  padding in a whole batch are not computed;
- **LM head only where read**: at the last position for ``last_position`` and for the
  prompt pass of ``sample``;
- **layer reuse** (:class:`~attnprune.rows.LayerInputCache`): the unrepaired model's hidden states entering
  decoder layers are cached once per input set; a masked forward starts at the deepest
  cached layer at or before its first pruned layer (exact: earlier layers compute what
  the unrepaired model computes). For sampling, the unrepaired keys/values of the skipped
  layers are cached too, so that the generated tokens can attend to them; checked once per
  input set against the plain path, with a fallback;
- **shared prefixes** (``last_position`` with ``groups``): the longest token prefix common
  to a group's sequences (a HolisticBias template's "I used to be ...") runs once per mask
  as a KV cache that each sequence continues from; checked once per input set against
  whole sequences on the unrepaired model (on a probe of each prefix's shortest, median
  and longest suffix), with a fallback (GPT-Neo's short local attention windows would see
  the padding between prefix and suffix).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from attnprune.heads import HeadMask, HeadMasker
from attnprune.rows import (LastReduce, LayerInputCache, PastFor, TokenRows, cache_argument, first_pruned_layer,
                            forward_rows, mask_rows, output_cache, row_batches, select_rows, trim_left_padding)

# the names a measure or a benchmark may import from here (the row types and helpers live in attnprune.rows)
__all__ = ["Backend", "DEFAULT_CACHE_MB", "LastReduce", "LayerInputCache", "TokenRows", "first_pruned_layer",
           "mask_rows"]


# ---------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------


# memory for the cached layer inputs of one input set, MB (the CLI's --layer-cache-mb default)
DEFAULT_CACHE_MB = 512


class Backend:
    """Runs one loaded model under head masks (see module docstring); holds its masking hooks."""

    def __init__(self, loaded, reuse_layers: bool = True, cache_mb: float = DEFAULT_CACHE_MB, trim_padding: bool = True,
                 last_logits_only: bool = True, share_prefixes: bool = True):
        self.loaded = loaded
        self.model, self.layout, self.tokenizer = loaded.model, loaded.layout, loaded.tokenizer
        self.reuse_layers = reuse_layers and cache_mb > 0
        self.cache_bytes = int(cache_mb * 2**20)
        self.trim_padding, self.last_logits_only, self.share_prefixes = trim_padding, last_logits_only, share_prefixes
        self.masker = HeadMasker(self.model, self.layout).install()
        self.inputs: list[TokenRows] = []

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id (0 when it has none; padding is always masked out)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model's tokenizer gives them (special tokens included)."""
        return self.tokenizer(text).input_ids

    def rows(self, seqs: Sequence[Sequence[int]], groups: Sequence[str] | None = None) -> TokenRows:
        """Prepare fixed inputs; ``groups`` (e.g. template names) allows shared prefixes."""
        rows = TokenRows(seqs, self.pad_id, groups if self.share_prefixes else None)
        self.inputs.append(rows)
        return rows

    def release(self) -> None:
        """Drop every cached unrepaired computation (the inputs stay usable)."""
        for rows in self.inputs:
            rows.release()

    def install(self) -> "Backend":
        """Reinstall the masking hooks after :meth:`close`."""
        self.masker.install()
        return self

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the masking hooks and drop the caches."""
        self.masker.remove()
        self.release()

    # ---- the batched masked forward ----------------------------------------------------
    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_masks: torch.Tensor,
                 batch_size: int, reduce: Callable[[torch.Tensor, slice, int], torch.Tensor],
                 logits_to_keep: int = 0, cache: LayerInputCache | None = None,
                 past_for: PastFor | None = None) -> torch.Tensor:
        """Run ``input_ids`` (``[rows, pos]``) with one mask per row, in batches.

        ``reduce(logits [batch, width, vocab], rows, width)`` turns each batch's logits into a
        small per-row tensor (logits are right-aligned at the batch's own, trimmed width).
        With ``cache`` (built on the first ``cache.built_rows`` rows, which the rest repeat
        mask after mask) each batch starts at the deepest cached layer before its first
        pruned layer; ``past_for(rows)`` gives each batch cached earlier tokens.
        """
        base_rows = torch.arange(input_ids.shape[0]) % cache.built_rows if cache is not None else None
        outs = []
        for rows in row_batches(input_ids.shape[0], batch_size):
            self.masker.set(row_masks[rows])
            kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
            ids, attn = input_ids[rows], attention_mask[rows]
            if self.trim_padding:
                ids, attn = trim_left_padding(ids, attn)
            past, past_attn = past_for(rows) if past_for else (None, None)
            start = cache.start_layer(first_pruned_layer(row_masks[rows])) if cache is not None else 0
            with cache.skip_to(start, base_rows[rows], ids.shape[1]) if start else nullcontext():
                out, _ = forward_rows(self.model, ids, attn, trim=False, past=past, past_attn=past_attn, **kwargs)
            outs.append(reduce(out.logits.float(), rows, ids.shape[1]).cpu())
        self.masker.set(None)
        return torch.cat(outs)

    def _layer_cache(self, rows: TokenRows, batch_size: int) -> LayerInputCache | None:
        """The layer inputs of ``rows`` (built once), or None when reuse is off."""
        if not self.reuse_layers:
            return None
        if rows.layer_cache is None:
            if rows.sharing:
                split = rows.split
                base = [HeadMask.all_active(*self.layout.shape)]
                past_for = self._past_for(rows, self._prefix_past(rows, base, 0, None))
                rows.layer_cache = LayerInputCache(self.layout, self.cache_bytes).build(
                    self.model, self.masker, split.ids, split.attn, batch_size, past_for=past_for)
                rows.prefix_cache = LayerInputCache(self.layout, self.cache_bytes).build(
                    self.model, self.masker, split.prefix_ids, split.prefix_attn, batch_size,
                    layers=rows.layer_cache.layers, trim=False)
            else:
                rows.layer_cache = LayerInputCache(self.layout, self.cache_bytes).build(
                    self.model, self.masker, rows.ids, rows.attn, batch_size)
        return rows.layer_cache

    # ---- last position ------------------------------------------------------------------
    def last_position(self, rows: TokenRows, masks: Sequence[HeadMask], reduce: LastReduce,
                      batch_size: int = 64) -> np.ndarray:
        """``[n_masks, n]``: ``reduce`` of the logits after each sequence's last token, per mask."""
        if rows.sharing is None:
            self._decide_sharing(rows, reduce, batch_size)
        cache = self._layer_cache(rows, batch_size)
        if rows.sharing:
            return self._shared_last(rows, masks, reduce, cache, batch_size)
        return self._whole_last(rows, masks, reduce, cache, batch_size)

    def _whole_last(self, rows: TokenRows, masks, reduce: LastReduce, cache, batch_size: int) -> np.ndarray:
        return self._last(rows.ids, rows.attn, rows, rows.order, masks, reduce, cache, batch_size)

    def _last(self, ids, attn, rows: TokenRows, order, masks, reduce: LastReduce, cache, batch_size: int,
              past_for: PastFor | None = None) -> np.ndarray:
        n = ids.shape[0]
        flat = self._forward(ids.repeat(len(masks), 1), attn.repeat(len(masks), 1), mask_rows(masks, n), batch_size,
                             lambda logits, r, w: reduce(logits[:, -1]),
                             logits_to_keep=1 if self.last_logits_only else 0, cache=cache, past_for=past_for)
        return rows.unsort(flat.numpy(), len(masks), order)

    def _prefix_past(self, rows: TokenRows, masks: Sequence[HeadMask], start: int, cache):
        """Keys/values of every distinct prefix under each mask (``[mask * G + prefix]`` rows)."""
        split = rows.split
        G = split.prefix_ids.shape[0]
        ids, attn = split.prefix_ids.repeat(len(masks), 1), split.prefix_attn.repeat(len(masks), 1)
        self.masker.set(mask_rows(masks, G))
        skip = cache.skip_to(start, torch.arange(len(ids)) % G) if start else nullcontext()
        with torch.no_grad(), skip:
            out, _ = forward_rows(self.model, ids, attn, trim=False, use_cache=True, logits_to_keep=1)
        self.masker.set(None)
        past = output_cache(out)
        # layers before ``start`` were skipped: give them placeholder keys of the right length,
        # which transformers reads to size the attention masks (the suffix pass skips them too)
        for layer in range(start):
            ref = past.layers[start]
            past.update(torch.zeros_like(ref.keys), torch.zeros_like(ref.values), layer)
        return past

    @staticmethod
    def _past_for(rows: TokenRows, past) -> PastFor:
        split = rows.split
        n, G = split.ids.shape[0], split.prefix_ids.shape[0]

        def past_for(r: slice):
            idx = torch.arange(r.start, r.stop)
            group = split.group[idx % n]
            return select_rows(past, (idx // n) * G + group), split.prefix_attn[group]

        return past_for

    def _shared_last(self, rows: TokenRows, masks, reduce: LastReduce, cache, batch_size: int) -> np.ndarray:
        """Each group's prefix (once per mask) continued by the sequences' suffixes."""
        first = first_pruned_layer(torch.stack([m.tensor() for m in masks]))
        start = cache.start_layer(first) if cache is not None else 0
        past_for = self._past_for(rows, self._prefix_past(rows, masks, start, rows.prefix_cache))
        return self._last(rows.split.ids, rows.split.attn, rows, rows.split.order, masks, reduce, cache, batch_size,
                          past_for)

    def _decide_sharing(self, rows: TokenRows, reduce: LastReduce, batch_size: int) -> None:
        """Share prefixes only where it reproduces whole sequences (checked once, unrepaired model).

        The check runs on :meth:`TokenRows.probe` (each prefix with its shortest, median and
        longest suffix, cut as in ``rows``): a whole pass over a test split of 10,000 prompts
        would cost more than the two masks measured on it. Nothing is cached for ``rows``
        before this decision (:meth:`last_position` makes it first), so there is nothing to drop.
        """
        if self.layout.is_hybrid:  # its recurrent layers' cache is a state, not keys and values to split by row
            rows.sharing = False
            return
        probe = rows.probe()
        base = [HeadMask.all_active(*self.layout.shape)]
        plain = self._whole_last(probe, base, reduce, None, batch_size)
        probe.sharing = True
        shared = self._shared_last(probe, base, reduce, None, batch_size)
        # float32 reordering noise is ~1e-7 of the scores' scale; an inexact path (GPT-Neo's local windows
        # seeing padding) differs far more, but can be small in absolute terms on a small-scale model
        scale = max(1.0, float(np.nanmax(np.abs(plain))))
        rows.sharing = bool(np.nanmax(np.abs(shared - plain)) < 1e-4 * scale)

    # ---- sums of token NLL -------------------------------------------------------------
    def sequence_nll(self, rows: TokenRows, masks: Sequence[HeadMask], batch_size: int = 8,
                     score_from: int | Sequence[int] = 1, top_k: int | None = None,
                     temperature: float = 1.0) -> np.ndarray:
        """``[n_masks, n]``: sum over each sequence's tokens ``t >= score_from`` of ``-log p(token_t | tokens < t)``.

        ``score_from`` (per sequence or one for all, at least 1) counts positions within the
        sequence's own tokens; the first token is never scored (it has no context). With
        ``top_k``, ``p`` is the distribution :meth:`sample` draws from (the ``top_k`` largest
        logits at ``temperature``, renormalised), and a token outside them has NLL ``inf``.
        """
        start = np.broadcast_to(np.asarray(score_from), (rows.n,))
        if (start < 1).any():
            raise ValueError("score_from must be at least 1")
        # per sorted row: the first scored column counted from the right edge of the row
        from_right = torch.as_tensor(rows.lengths[rows.order] - start[rows.order])
        n = rows.n
        ids_all = rows.ids.repeat(len(masks), 1)

        def nll_sums(logits: torch.Tensor, r: slice, width: int) -> torch.Tensor:
            target = ids_all[r, -width:][:, 1:]
            if top_k is None:
                nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="none").view(
                    target.shape)
            else:  # the sampler's truncated distribution
                scaled = logits[:, :-1].float() / temperature
                top = scaled.topk(top_k, dim=-1).values
                picked = scaled.gather(-1, target.unsqueeze(-1).to(scaled.device)).squeeze(-1)
                nll = torch.where(picked >= top[..., -1], top.logsumexp(-1) - picked,
                                  torch.full_like(picked, float("inf"))).cpu()
            # target column j (0..width-2) is scored when it lies within the row's last ``from_right`` tokens
            cols = torch.arange(width - 1)
            keep = cols.unsqueeze(0) >= (width - 1 - from_right[torch.arange(r.start, r.stop) % n]).unsqueeze(1)
            return torch.where(keep, nll, torch.zeros((), dtype=nll.dtype)).sum(-1)

        flat = self._forward(ids_all, rows.attn.repeat(len(masks), 1), mask_rows(masks, n), batch_size, nll_sums,
                             cache=self._layer_cache(rows, batch_size))
        return rows.unsort(flat.numpy(), len(masks))

    # ---- sampling with common random numbers -------------------------------------------
    @torch.no_grad()
    def sample(self, rows: TokenRows, masks: Sequence[HeadMask], uniforms: torch.Tensor, new_tokens: int,
               top_k: int, temperature: float, eos_id: int | None, batch_size: int = 32) -> list[torch.Tensor]:
        """Per mask, ``[n, new_tokens]`` sampled token ids (-1 after EOS), sequences in caller order.

        ``uniforms`` ``[n, new_tokens]`` drive the sampling (inverse CDF over the top-k
        distribution at ``temperature``), so a sequence's continuation depends on its own
        stream and the mask only, not on the batch it runs in.
        """
        n = rows.n
        u_sorted = uniforms[torch.as_tensor(rows.order)]
        stacked = torch.stack([m.tensor() for m in masks])
        cache = self._kv_reuse_cache(rows, batch_size, new_tokens, top_k, temperature, eos_id, u_sorted)
        out = torch.full((n * len(masks), new_tokens), -1, dtype=torch.long)
        for r in row_batches(n * len(masks), batch_size):
            idx = torch.arange(r.start, r.stop)
            out[r] = self._generate(rows, idx % n, stacked[idx // n], u_sorted[idx % n], new_tokens, top_k,
                                    temperature, eos_id, cache)
        inverse = np.argsort(rows.order, kind="stable")
        return [out[m * n:(m + 1) * n][torch.as_tensor(inverse)] for m in range(len(masks))]

    def _generate(self, rows: TokenRows, base_rows: torch.Tensor, row_masks: torch.Tensor, uniforms: torch.Tensor,
                  new_tokens: int, top_k: int, temperature: float, eos_id: int | None,
                  cache: LayerInputCache | None) -> torch.Tensor:
        """One batch: prompt pass (from a cached layer when possible), then token by token."""
        device = next(self.model.parameters()).device
        cache_arg = cache_argument(self.model)
        ids, attn = rows.ids[base_rows], rows.attn[base_rows]
        if self.trim_padding:
            ids, attn = trim_left_padding(ids, attn)
        self.masker.set(row_masks)
        start = cache.start_layer(first_pruned_layer(row_masks)) if cache is not None else 0
        with cache.skip_to(start, base_rows, ids.shape[1]) if start else nullcontext():
            res, _ = forward_rows(self.model, ids, attn, trim=False, use_cache=True, logits_to_keep=1)
        past = output_cache(res)
        for layer in range(start):  # skipped layers: the unrepaired keys/values of the prompt
            k, v = rows.base_kv[layer]
            past.update(k[base_rows][:, :, -ids.shape[1]:], v[base_rows][:, :, -ids.shape[1]:], layer)
        attn = attn.to(device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        out = torch.full((ids.shape[0], new_tokens), -1, dtype=torch.long)
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        cur = ids  # replaced by the last sampled token after each step
        for step in range(new_tokens):
            if step:
                res = self.model(input_ids=cur, attention_mask=attn, position_ids=positions, use_cache=True,
                                 logits_to_keep=1, **{cache_arg: past})
                past = output_cache(res)
            logits = res.logits[:, -1].float() / temperature
            top, top_ids = logits.topk(top_k, dim=-1)
            cdf = torch.softmax(top, dim=-1).cumsum(-1)
            u = uniforms[:, step:step + 1].to(cdf) * cdf[:, -1:]
            pick = torch.searchsorted(cdf, u).clamp(max=top_k - 1)
            nxt = top_ids.gather(-1, pick).squeeze(-1)
            out[:, step] = torch.where(done, -1, nxt.cpu())
            if eos_id is not None:
                done |= nxt.cpu() == eos_id
            if bool(done.all()):
                break
            cur = nxt.unsqueeze(-1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
            positions = positions + 1
        self.masker.set(None)
        return out

    def _kv_reuse_cache(self, rows: TokenRows, batch_size: int, new_tokens: int, top_k: int, temperature: float,
                        eos_id: int | None, u_sorted: torch.Tensor) -> LayerInputCache | None:
        """Layer inputs and unrepaired keys/values of the prompts, when they fit and are exact here."""
        if not self.reuse_layers or rows.kv_reuse is False or self.layout.is_hybrid:  # hybrid: see _decide_sharing
            return None
        cache = self._layer_cache(rows, batch_size)
        if cache is None or not cache.layers:
            return None
        if rows.base_kv is None:
            rows.base_kv = self._base_kv(rows, batch_size, max(cache.layers))
            if rows.base_kv is None:
                rows.kv_reuse = False
                return None
        if rows.kv_reuse is None:
            # once per input set: a mask pruning a head in the deepest cached layer, with and
            # without reuse, on a few prompts; any difference turns reuse off for sampling
            probe = HeadMask.from_pruned(*self.layout.shape, [(self.layout.layer_ids.index(max(cache.layers)), 0)]
                                         ).tensor()
            few = torch.arange(min(8, rows.n))
            masks = probe.expand(len(few), *probe.shape)
            args = (new_tokens, top_k, temperature, eos_id)
            plain = self._generate(rows, few, masks, u_sorted[few], *args, None)
            reused = self._generate(rows, few, masks, u_sorted[few], *args, cache)
            rows.kv_reuse = bool(torch.equal(plain, reused))
            if not rows.kv_reuse:
                return None
        return cache

    @torch.no_grad()
    def _base_kv(self, rows: TokenRows, batch_size: int, deepest: int) -> list | None:
        """Unrepaired keys/values ``[rows, kv_heads, width, d]`` of layers ``< deepest``, full width."""
        per_token = 0
        self.masker.set(None)
        parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(deepest)]
        full = rows.ids.shape[1]
        for r in row_batches(rows.n, batch_size):
            out, width = forward_rows(self.model, rows.ids[r], rows.attn[r], trim=self.trim_padding, use_cache=True,
                                      logits_to_keep=1)
            past = output_cache(out)
            for layer in range(deepest):
                k, v = past.layers[layer].keys, past.layers[layer].values
                if k.shape[2] != width:  # a sliding-window layer that kept fewer positions: no reuse
                    return None
                per_token = per_token or 2 * k.shape[1] * k.shape[3] * k.element_size() * deepest
                parts[layer].append((F.pad(k, (0, 0, full - width, 0)), F.pad(v, (0, 0, full - width, 0))))
            if per_token * rows.n * full > self.cache_bytes:
                return None
        return [(torch.cat([k for k, _ in p]), torch.cat([v for _, v in p])) for p in parts]

    # ---- gradients -----------------------------------------------------------------------
    def removal_estimates(self, rows: TokenRows, reduce: LastReduce | None = None, batch_size: int = 16) -> np.ndarray:
        """``[n, L, H]`` first-order estimate of removing each head, per sequence (caller order).

        The value of a sequence is ``reduce`` of its last-position logits, or (``reduce=None``)
        the sum of its token NLL after the first token. Removing head ``h`` moves the gate
        from 1 to 0, so the estimate is minus the value's gradient with respect to that
        gate at 1 (attribution patching): one forward and backward pass for every head at once.
        """
        L, H = self.layout.shape
        out = torch.zeros(rows.n, L, H)
        device = next(self.model.parameters()).device
        try:
            for r in row_batches(rows.n, batch_size):
                ids, attn = trim_left_padding(rows.ids[r], rows.attn[r])
                gates = torch.ones(ids.shape[0], L, H, requires_grad=True)
                self.masker.set_gates(gates)
                if reduce is not None:
                    res, _ = forward_rows(self.model, ids, attn, trim=False, logits_to_keep=1)
                    value = reduce(res.logits[:, -1].float())
                else:
                    res, _ = forward_rows(self.model, ids, attn, trim=False)
                    logits, target = res.logits[:, :-1].float(), ids[:, 1:].to(device)
                    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
                    value = (nll * (attn[:, 1:] * attn[:, :-1]).to(nll)).sum(-1)
                (grad,) = torch.autograd.grad(value.sum(), gates)
                out[r] = -grad
        finally:
            self.masker.set(None)
        caller = torch.empty_like(out)
        caller[torch.as_tensor(rows.order)] = out
        return caller.numpy()

    def gate_gradients(self, rows: TokenRows) -> np.ndarray:
        """``[L, H]`` sum over sequences of ``|d mean NLL / d gate|``, all gates at 1 (one sequence at a time)."""
        gates = torch.ones(self.layout.shape, requires_grad=True)
        total = torch.zeros(self.layout.shape)
        device = next(self.model.parameters()).device
        inverse = np.argsort(rows.order, kind="stable")
        try:
            for i in inverse:
                ids, attn = trim_left_padding(rows.ids[i:i + 1], rows.attn[i:i + 1])
                self.masker.set_gates(gates)
                ids = ids.to(device)
                loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
                (grad,) = torch.autograd.grad(loss, gates)
                total += grad.abs()
        finally:
            self.masker.set(None)
        return total.numpy()
