"""Where the attention heads of a causal LM live.

Architectures are data: :data:`ADAPTERS` maps a config ``model_type`` to the path of the
decoder-layer list and, inside each layer, the path of the attention output projection
(the module whose *input* is the concatenation of the per-head outputs,
``[batch, pos, head * d_head]``). Masking a head zeroes its slice of that input, which is
exactly equivalent to removing the head.

Adding an architecture is one line in :data:`ADAPTERS`. A ``model_type`` not in the table
is tried against every known path pair; if none fits, :func:`head_layout` raises a
:class:`~attnprune.errors.ModelLoadError` that says what could not be found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from attnprune.errors import ModelLoadError


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths of one architecture family (relative to the top-level model)."""

    layers: str
    """Dotted path of the ``ModuleList`` of decoder layers."""
    out_proj: str
    """Dotted path, inside one layer, of the attention output projection."""
    query_heads_per_head: int = 1
    """Query heads whose outputs are combined into one slice of the projection's input (a head of the mask).

    2 for DiffLlama: its differential head ``j`` subtracts query head ``j + H/2``'s attention
    from query head ``j``'s and group-norms the pair, so the projection reads ``H/2`` slices,
    each twice a query head's width.
    """


_LLAMA_LIKE = ArchAdapter("model.layers", "self_attn.o_proj")

ADAPTERS: dict[str, ArchAdapter] = {
    "gpt2": ArchAdapter("transformer.h", "attn.c_proj"),
    "gpt_bigcode": ArchAdapter("transformer.h", "attn.c_proj"),
    "gpt_neo": ArchAdapter("transformer.h", "attn.attention.out_proj"),
    "gptj": ArchAdapter("transformer.h", "attn.out_proj"),
    "codegen": ArchAdapter("transformer.h", "attn.out_proj"),
    "gpt_neox": ArchAdapter("gpt_neox.layers", "attention.dense"),
    "opt": ArchAdapter("model.decoder.layers", "self_attn.out_proj"),
    "bloom": ArchAdapter("transformer.h", "self_attention.dense"),
    "falcon": ArchAdapter("transformer.h", "self_attention.dense"),
    "phi": ArchAdapter("model.layers", "self_attn.dense"),
    "gemma3": ArchAdapter("model.language_model.layers", "self_attn.o_proj"),
    "xglm": ArchAdapter("model.layers", "self_attn.out_proj"),
    "biogpt": ArchAdapter("biogpt.layers", "self_attn.out_proj"),
    "mpt": ArchAdapter("transformer.blocks", "attn.out_proj"),
    "gpt_neox_japanese": ArchAdapter("gpt_neox_japanese.layers", "attention.dense"),
    "diffllama": ArchAdapter("model.layers", "self_attn.o_proj", query_heads_per_head=2),
    # hybrids: the path exists in the attention layers only (Mamba mixers / recurrent blocks elsewhere)
    "nemotron_h": ArchAdapter("model.layers", "mixer.o_proj"),
    "recurrent_gemma": ArchAdapter("model.layers", "temporal_block.o_proj"),
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
            "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "smollm3",
            "granite", "stablelm", "cohere", "starcoder2", "internlm2", "deepseek_v2",
        )
    },
}


# Architectures whose attention output projection does not read one slice per query head:
# refused in one sentence (why, and what masking them would need) rather than masked wrongly.
REFUSED: dict[str, str] = {
    "deepseek_v4": "its attention output is a grouped projection (heads mixed in groups before the last projection), "
                   "so no slice of one projection's input is one head; masking it needs a per-group adapter",
    "longcat_flash": "each decoder layer holds two attention blocks, and a mask row per layer cannot address both; "
                     "masking it needs a layout with two attention modules per layer",
}


@dataclass
class HeadLayout:
    """The attention heads of a loaded model: counts, widths and the output-projection modules.

    A mask row is one *attention layer*: ``n_layers`` rows of up to ``n_heads`` query heads,
    ``n_kv_heads`` key/value heads per layer (equal to ``n_heads`` without grouped-query
    attention). Row ``r`` is decoder layer ``layer_ids[r]`` of the model, it has
    ``row_heads[r]`` query heads, and they are ``head_dims[r]`` wide. For most models every
    decoder layer has attention with the same heads, so rows are layers and ``row_heads`` and
    ``head_dims`` are constant; a hybrid (Jamba, Qwen3-Next, ...) has rows only for its
    attention layers, Gemma-4 has wider heads in its full-attention layers, and Laguna has
    more heads in some layers than in others. Masks keep one ``(n_layers, n_heads)`` grid:
    the cells past a row's own heads (:attr:`heads` is False there) are no heads, always
    active, never pruned.
    """

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layers_path: str
    out_proj_path: str
    out_projs: list[nn.Module] = field(repr=False)
    layer_modules: list[nn.Module] = field(repr=False, default_factory=list)
    """Every decoder layer of the model (attention-free ones included), by model layer index."""
    layer_ids: list[int] = field(default_factory=list)
    """Model layer index of each mask row (empty: row ``r`` is layer ``r``)."""
    head_dims: list[int] = field(default_factory=list)
    """Head width of each mask row (empty: ``head_dim`` everywhere)."""
    row_heads: list[int] = field(default_factory=list)
    """Query heads of each mask row (empty: ``n_heads`` everywhere; ``n_heads`` is the largest)."""

    def __post_init__(self):
        if not self.layer_ids:
            self.layer_ids = list(range(self.n_layers))
        if not self.head_dims:
            self.head_dims = [self.head_dim] * self.n_layers
        if not self.row_heads:
            self.row_heads = [self.n_heads] * self.n_layers

    @property
    def n_total(self) -> int:
        """Number of maskable heads (``n_layers * n_heads`` unless the rows differ)."""
        return sum(self.row_heads)

    @property
    def is_ragged(self) -> bool:
        """Whether the rows have different head counts (some cells of the mask grid are no heads)."""
        return len(set(self.row_heads)) > 1

    @property
    def heads(self) -> np.ndarray:
        """Bool ``(n_layers, n_heads)``: which cells of the mask grid are heads of the model."""
        return head_cells(self.row_heads, self.n_heads)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_heads)``, the shape of a :class:`~attnprune.heads.HeadMask`."""
        return (self.n_layers, self.n_heads)

    @property
    def n_model_layers(self) -> int:
        """Decoder layers of the model, attention-free ones included."""
        return len(self.layer_modules) or self.n_layers

    @property
    def is_hybrid(self) -> bool:
        """Whether some decoder layers have no (softmax) attention and hence no mask row."""
        return self.n_model_layers != self.n_layers

    def head_slice(self, row: int, head: int) -> slice:
        """Columns of row ``row``'s output-projection input that hold head ``head``."""
        d = self.head_dims[row]
        return slice(head * d, (head + 1) * d)

    def model_layer(self, row: int) -> int:
        """Model layer index of mask row ``row`` (``n_model_layers`` for ``row == n_layers``: past the last)."""
        return self.layer_ids[row] if row < self.n_layers else self.n_model_layers

    def attention_module(self, layer: int) -> nn.Module:
        """The module that holds the output projection of mask row ``layer`` (its q/k/v live there too)."""
        return _parent(self.layer_modules[self.layer_ids[layer]], self.out_proj_path)

    def summary(self) -> str:
        """One line: rows x heads = total, and for a hybrid which decoder layers have the attention."""
        if self.is_ragged:
            text = (f"{self.n_layers} layers x {min(self.row_heads)}-{self.n_heads} heads = {self.n_total} "
                    f"(heads per layer: {', '.join(map(str, self.row_heads))})")
        else:
            text = f"{self.n_layers} layers x {self.n_heads} heads = {self.n_total}"
        if self.is_hybrid:
            text += (f" (attention in {self.n_layers} of {self.n_model_layers} decoder layers: "
                     f"{', '.join(map(str, self.layer_ids))}; mask row r is the r-th of them)")
        return text

    def describe(self) -> dict:
        """JSON-ready summary (no modules)."""
        out = {
            "model_type": self.model_type,
            "layers": self.n_layers,
            "heads_per_layer": self.n_heads,
            "kv_heads_per_layer": self.n_kv_heads,
            "head_dim": self.head_dim,
            "total_heads": self.n_total,
            "grouped_query_attention": self.n_kv_heads != self.n_heads,
            "out_proj": f"{self.layers_path}.<layer>.{self.out_proj_path}",
        }
        if len(set(self.head_dims)) > 1:
            out["head_dims"] = list(self.head_dims)
        if self.is_ragged:
            out["heads_by_layer"] = list(self.row_heads)
        if self.is_hybrid:
            out["model_layers"] = self.n_model_layers
            out["attention_layers"] = list(self.layer_ids)
        return out


def head_cells(row_heads: list[int], n_heads: int | None = None) -> np.ndarray:
    """Bool ``(len(row_heads), n_heads)``: cell ``[r, h]`` is a head when ``h < row_heads[r]``."""
    width = max(row_heads) if n_heads is None else n_heads
    return np.arange(width)[None, :] < np.asarray(row_heads)[:, None]


def projection_in_features(module: nn.Module) -> int:
    """Width of a projection's input: ``nn.Linear`` stores ``[out, in]``, GPT-2's Conv1D ``[in, out]``."""
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and hasattr(module, "nf"):
        return weight.shape[0]
    raise TypeError(f"unsupported projection module {type(module).__name__}")


def projection_input_axis(module: nn.Module) -> int:
    """Axis of ``module.weight`` that indexes the projection's input features."""
    return 1 if isinstance(module, nn.Linear) else 0


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _text_config(config):
    sub = getattr(config, "text_config", None)
    return sub if sub is not None and hasattr(sub, "num_attention_heads") else config


def _resolve(model: nn.Module, adapter: ArchAdapter, n_layers: int):
    """``(decoder layers, their projections or None)`` when ``adapter`` fits ``model``, else None."""
    layers = _get(model, adapter.layers)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) != n_layers:
        return None
    projs = [_get(layer, adapter.out_proj) for layer in layers]
    projs = [p if p is not None and hasattr(p, "weight") else None for p in projs]
    if all(p is None for p in projs):
        return None
    return list(layers), projs


def _parent(layer: nn.Module, out_proj: str) -> nn.Module | None:
    return _get(layer, out_proj.rsplit(".", 1)[0]) if "." in out_proj else layer


def _softmax_rows(model_type: str, layers: list[nn.Module], projs: list, adapter: ArchAdapter) -> list[int]:
    """Layers whose projection is a softmax attention's: all that have one, unless the kinds are mixed.

    Hybrids such as MiniMax or Kimi-Linear put linear attention (lightning, delta rule) at
    the same path in some layers. Where a model mixes attention classes, the ones without
    ``is_causal`` (what transformers' softmax attention modules set) are linear attention
    and have no heads to prune; a mix that this does not separate is refused.
    """
    have = [i for i, p in enumerate(projs) if p is not None]
    kinds = {i: type(_parent(layers[i], adapter.out_proj)) for i in have}
    if len(set(kinds.values())) == 1:
        return have
    causal = [i for i in have if hasattr(_parent(layers[i], adapter.out_proj), "is_causal")]
    if causal and len({kinds[i] for i in causal}) == 1:
        return causal
    names = ", ".join(sorted({k.__name__ for k in kinds.values()}))
    raise ModelLoadError(
        f"Model type '{model_type}' mixes attention modules ({names}) at {adapter.layers}.<i>.{adapter.out_proj} and "
        "attnprune cannot tell which of them are softmax attention with heads to prune; it needs an entry in "
        "attnprune.models.layouts.ADAPTERS that says so.")


def _row_heads(module: nn.Module | None, n_heads: int) -> int:
    """Query heads of one attention module: its own count where it declares one, else the config's."""
    for name in ("num_heads", "num_attention_heads", "n_heads"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return n_heads


def _declared_width(module: nn.Module | None) -> int | None:
    """The head width an attention module declares for its output (value heads first, for latent attention)."""
    for name in ("v_head_dim", "head_dim"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def head_layout(model: nn.Module) -> HeadLayout:
    """Derive the :class:`HeadLayout` of a loaded causal LM.

    Raises :class:`~attnprune.errors.ModelLoadError`, in one sentence that says why, when
    the architecture cannot be mapped or its heads' slices cannot be told apart.
    """
    config = _text_config(model.config)
    model_type = getattr(model.config, "model_type", "unknown")
    n_layers = getattr(config, "num_hidden_layers", None)
    n_heads = getattr(config, "num_attention_heads", None)
    if not isinstance(n_layers, int) or not isinstance(n_heads, int):
        raise ModelLoadError(
            f"The config of model type '{model_type}' has no num_hidden_layers/num_attention_heads, "
            "so attnprune cannot tell how many attention heads it has; use a decoder-only causal LM."
        )
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if model_type == "falcon" and getattr(config, "multi_query", False) and not getattr(
        config, "new_decoder_architecture", False
    ):
        n_kv = 1

    if model_type in REFUSED:
        raise ModelLoadError(f"attnprune cannot mask model type '{model_type}': {REFUSED[model_type]}.")
    candidates = [(model_type, ADAPTERS[model_type])] if model_type in ADAPTERS else []
    # an adapter that regroups query heads describes its own architecture only
    candidates += [(k, a) for k, a in ADAPTERS.items() if k != model_type and a.query_heads_per_head == 1]
    # an adapter that finds the projection in every layer wins over one that finds it in some (a hybrid)
    resolved = [(a, found) for _, a in candidates if (found := _resolve(model, a, n_layers)) is not None]
    resolved.sort(key=lambda item: sum(p is None for p in item[1][1]))
    for adapter, (layer_modules, all_projs) in resolved:
        rows = _softmax_rows(model_type, layer_modules, all_projs, adapter)
        projs = [all_projs[i] for i in rows]
        widths = [projection_in_features(p) for p in projs]
        attns = [_parent(layer_modules[i], adapter.out_proj) for i in rows]
        heads = [_row_heads(a, n_heads) // adapter.query_heads_per_head for a in attns]
        if any(w % h for w, h in zip(widths, heads)):
            if adapter is ADAPTERS.get(model_type):
                raise ModelLoadError(_shape_sentence(model_type, "its output projection widths", widths, heads, rows))
            continue
        dims = [w // h for w, h in zip(widths, heads)]
        for i, (attn, d) in enumerate(zip(attns, dims)):
            declared = _declared_width(attn)
            declared = declared * adapter.query_heads_per_head if declared is not None else None
            if declared is not None and declared != d and len(set(dims)) > 1:
                raise ModelLoadError(
                    f"Layer {rows[i]} of model type '{model_type}' declares heads {declared} wide, but its output "
                    f"projection reads {widths[i]} inputs for {heads[i]} heads ({d} each); attnprune cannot tell "
                    "where one head's slice ends, so it does not mask this model.")
        return HeadLayout(
            model_type=model_type,
            n_layers=len(rows),
            n_heads=max(heads),
            n_kv_heads=int(n_kv),
            head_dim=dims[0],
            layers_path=adapter.layers,
            out_proj_path=adapter.out_proj,
            out_projs=projs,
            layer_modules=layer_modules,
            layer_ids=rows,
            head_dims=dims,
            row_heads=heads,
        )
    tried = sorted({f"{a.layers}.<i>.{a.out_proj}" for a in ADAPTERS.values()})
    raise ModelLoadError(
        f"Could not find the attention output projections of model type '{model_type}' "
        f"(looked for {', '.join(tried)}); add its paths to attnprune.models.layouts.ADAPTERS."
    )


def _shape_sentence(model_type: str, what: str, widths: list[int], heads: list[int], rows: list[int]) -> str:
    odd = next(i for i, (w, h) in enumerate(zip(widths, heads)) if w % h)
    return (f"Model type '{model_type}': {what} do not split into heads (layer {rows[odd]}: {widths[odd]} inputs for "
            f"{heads[odd]} heads), so attnprune cannot tell where one head's slice ends.")


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
