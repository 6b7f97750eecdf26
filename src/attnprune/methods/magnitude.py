"""``magnitude``: prune the heads with the smallest L2 norm of their weights, at each ratio.

A head's weights: its query rows, its slice of the output projection's input columns, and
its KV group's key/value rows. With grouped-query attention a KV group's key/value squared
norm is shared equally by the query heads of the group. Architectures whose q/k/v paths
are not ``q_proj``/``k_proj``/``v_proj`` use the output-projection slice only (reported in
the method's notes).
"""

from __future__ import annotations

import numpy as np
import torch

from attnprune.methods.base import Method, MethodContext, Proposal, register_method
from attnprune.models.layouts import projection_input_axis


def _linear(module: torch.nn.Module, name: str) -> torch.nn.Linear | None:
    sub = getattr(module, name, None)
    return sub if isinstance(sub, torch.nn.Linear) else None


def head_magnitudes(layout) -> tuple[np.ndarray, str]:
    """``[L, H]`` L2 norms of each head's weights, and which weights were counted."""
    kv = layout.n_kv_heads
    out = np.zeros(layout.shape)
    with_qkv = 0
    for l, proj in enumerate(layout.out_projs):
        d, H = layout.head_dims[l], layout.row_heads[l]
        group = max(1, H // kv)
        w = proj.weight.detach().float()
        if projection_input_axis(proj) == 1:  # nn.Linear [out, H*d]
            sq = (w.reshape(w.shape[0], H, d) ** 2).sum(dim=(0, 2))
        else:  # Conv1D [H*d, out]
            sq = (w.reshape(H, d, w.shape[1]) ** 2).sum(dim=(1, 2))
        attn = layout.attention_module(l)
        q, k, v = (_linear(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        if q is not None and k is not None and v is not None and q.weight.shape[0] == H * d \
                and k.weight.shape[0] == v.weight.shape[0] == kv * d and H % kv == 0:  # latent attention: o only
            with_qkv += 1
            sq = sq + (q.weight.detach().float().reshape(H, d, -1) ** 2).sum(dim=(1, 2))
            kv_sq = (k.weight.detach().float().reshape(kv, d, -1) ** 2).sum(dim=(1, 2)) + (
                v.weight.detach().float().reshape(kv, d, -1) ** 2).sum(dim=(1, 2))
            sq = sq + (kv_sq / group).repeat_interleave(group)
        out[l, :H] = sq.sqrt().numpy()
    n = layout.n_layers
    used = "q, k, v, o" if with_qkv == n else "o" if not with_qkv else \
        f"q, k, v, o in {with_qkv} of {n} layers, o elsewhere"
    return out, used


@register_method("magnitude")
class Magnitude(Method):
    """Lowest-norm heads at each ratio of FASP's grid."""

    description = "prune the heads with the smallest L2 norm of their q/k/v/o weights"

    def propose(self, ctx: MethodContext) -> Proposal:
        scores, used = head_magnitudes(ctx.layout)
        return self.proposal(ctx, ctx.lowest_masks(scores), f"weights counted: {used}")
