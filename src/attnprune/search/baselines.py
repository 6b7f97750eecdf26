"""Baseline pruning methods, each proposing candidate masks through one small interface.

Every method returns a list of candidate masks (one per pruning ratio / grid point); the
comparison evaluates them on the validation split and keeps the lowest-bias one within the
perplexity budget, the same rule the Attention Pruning repair uses.

- ``fasp`` (Zayed et al., AAAI 2024): single-head knockout scores; protect the ``gamma``
  fraction of heads whose removal raises perplexity most; among the rest prune the
  ``int(alpha * N)`` heads whose single removal gives the lowest bias. Grid: alpha
  0.02..0.20 step 0.02, gamma 0.2..0.7 step 0.1.
- ``bias_only`` / ``ppl_only``: rank heads by knockout bias / knockout perplexity alone.
- ``random``: uniformly random heads.
- ``magnitude``: L2 norm of a head's weights - its query rows, its slice of the output
  projection's input columns, and its KV group's key/value rows. With grouped-query
  attention a KV group's key/value squared norm is shared equally by the query heads of the
  group. Architectures whose q/k/v paths the adapter table does not list use the
  output-projection slice only (reported in the method's notes).
- ``gradient``: |d NLL / d gate| of each head on the validation perplexity corpus (gates
  all 1), summed over windows; the least important heads are pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from attnprune.heads import HeadMask, HeadMasker
from attnprune.models.layouts import projection_input_axis

ALPHAS = tuple(round(0.02 * i, 2) for i in range(1, 11))
GAMMAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def knockout_masks(shape: tuple[int, int]) -> list[HeadMask]:
    """One mask per head with only that head pruned, in (layer, head) order."""
    return [HeadMask.from_pruned(*shape, [(l, h)]) for l in range(shape[0]) for h in range(shape[1])]


def prune_lowest(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> HeadMask:
    """Prune the ``k`` heads with the lowest ``scores`` ``[L, H]`` (among ``allowed`` heads)."""
    flat = scores.reshape(-1).astype(float).copy()
    if allowed is not None:
        flat[~allowed.reshape(-1)] = np.inf
    order = np.argsort(flat, kind="stable")[:k]
    L, H = scores.shape
    return HeadMask.from_pruned(L, H, [divmod(int(i), H) for i in order if np.isfinite(flat[i])])


def fasp_mask(knock_bias: np.ndarray, knock_ppl: np.ndarray, alpha: float, gamma: float) -> HeadMask:
    """FASP's selection from knockout scores ``[L, H]`` (see module docstring)."""
    n = knock_bias.size
    n_protect = int(gamma * n)
    protect = np.zeros(n, dtype=bool)
    protect[np.argsort(-knock_ppl.reshape(-1), kind="stable")[:n_protect]] = True
    return prune_lowest(knock_bias, int(alpha * n), allowed=~protect.reshape(knock_bias.shape))


@dataclass
class Knockouts:
    """Validation bias and perplexity of every single-head knockout, ``[L, H]`` each."""

    bias: np.ndarray
    perplexity: np.ndarray


def counts(n_total: int, ratios=ALPHAS) -> list[int]:
    """Head counts of the pruning-ratio grid."""
    return sorted({max(1, int(r * n_total)) for r in ratios})


def fasp(knock: Knockouts) -> list[HeadMask]:
    """FASP candidates over its alpha x gamma grid."""
    return list(dict.fromkeys(fasp_mask(knock.bias, knock.perplexity, a, g) for a in ALPHAS for g in GAMMAS))


def bias_only(knock: Knockouts) -> list[HeadMask]:
    """Prune the heads whose knockout gives the lowest bias, at each ratio."""
    return [prune_lowest(knock.bias, k) for k in counts(knock.bias.size)]


def ppl_only(knock: Knockouts) -> list[HeadMask]:
    """Prune the heads whose knockout raises perplexity least, at each ratio."""
    return [prune_lowest(knock.perplexity, k) for k in counts(knock.bias.size)]


def random_heads(shape: tuple[int, int], seed: int = 0) -> list[HeadMask]:
    """Uniformly random heads at each ratio (seeded)."""
    rng = np.random.default_rng(seed)
    return [prune_lowest(rng.random(shape), k) for k in counts(shape[0] * shape[1])]


def _find(module: torch.nn.Module, names: tuple[str, ...]):
    for name in names:
        sub = module
        for part in name.split("."):
            sub = getattr(sub, part, None)
            if sub is None:
                break
        if isinstance(sub, torch.nn.Linear):
            return sub
    return None


def head_magnitudes(layout) -> tuple[np.ndarray, str]:
    """``[L, H]`` L2 norms of each head's weights, and which weights were counted."""
    d, H, kv = layout.head_dim, layout.n_heads, layout.n_kv_heads
    group = H // kv
    out = np.zeros(layout.shape)
    used = "o"
    for l, proj in enumerate(layout.out_projs):
        w = proj.weight.detach().float()
        if projection_input_axis(proj) == 1:  # nn.Linear [out, H*d]
            sq = (w.reshape(w.shape[0], H, d) ** 2).sum(dim=(0, 2))
        else:  # Conv1D [H*d, out]
            sq = (w.reshape(H, d, w.shape[1]) ** 2).sum(dim=(1, 2))
        attn = layout.attention_module(l)
        q, k, v = (_find(attn, (n,)) for n in ("q_proj", "k_proj", "v_proj"))
        if q is not None and k is not None and v is not None:
            used = "q, k, v, o"
            sq = sq + (q.weight.detach().float().reshape(H, d, -1) ** 2).sum(dim=(1, 2))
            kv_sq = (k.weight.detach().float().reshape(kv, d, -1) ** 2).sum(dim=(1, 2)) + (
                v.weight.detach().float().reshape(kv, d, -1) ** 2).sum(dim=(1, 2))
            sq = sq + (kv_sq / group).repeat_interleave(group)
        out[l] = sq.sqrt().numpy()
    return out, used


def magnitude(layout) -> tuple[list[HeadMask], str]:
    """Prune the lowest-norm heads at each ratio."""
    scores, used = head_magnitudes(layout)
    return [prune_lowest(scores, k) for k in counts(layout.n_total)], used


def head_gradients(model, layout, windows: torch.Tensor) -> np.ndarray:
    """``[L, H]`` sum over windows of |d NLL / d gate|, gates all 1."""
    gates = torch.ones(layout.shape, requires_grad=True)
    total = torch.zeros(layout.shape)
    device = next(model.parameters()).device
    with HeadMasker(model, layout) as masker:
        for row in windows:
            masker.set_gates(gates)
            ids = row.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (grad,) = torch.autograd.grad(loss, gates)
            total += grad.abs()
    return total.numpy()


def gradient(model, layout, windows: torch.Tensor) -> list[HeadMask]:
    """Prune the heads with the smallest gradient importance at each ratio."""
    scores = head_gradients(model, layout, windows)
    return [prune_lowest(scores, k) for k in counts(layout.n_total)]


def direct_sa_cost(evaluate: Callable[[HeadMask], tuple[float, float]], shape, log_budget: float, weight: float,
                   unit: float):
    """Annealing cost on the real model: ``evaluate(mask) -> (bias, perplexity)`` for each state."""

    def cost(states: torch.Tensor) -> torch.Tensor:
        out = []
        for row in states:
            b, ppl = evaluate(HeadMask(row.numpy().reshape(shape).astype(bool)))
            out.append(b + weight * max(0.0, math.log(ppl) - log_budget) / unit)
        return torch.tensor(out)

    return cost
