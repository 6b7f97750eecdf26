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

from torch import nn

from attnprune.errors import ModelLoadError


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths of one architecture family (relative to the top-level model)."""

    layers: str
    """Dotted path of the ``ModuleList`` of decoder layers."""
    out_proj: str
    """Dotted path, inside one layer, of the attention output projection."""


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
    "diffllama": "its output projection reads differential heads (two query heads' attention maps subtracted and "
                 "group-normed together, twice a head's width), so zeroing one query head's slice removes half of a "
                 "differential head; masking it needs a layout of differential heads",
    "deepseek_v4": "its attention output is a grouped projection (heads mixed in groups before the last projection), "
                   "so no slice of one projection's input is one head; masking it needs a per-group adapter",
    "longcat_flash": "each decoder layer holds two attention blocks, and a mask row per layer cannot address both; "
                     "masking it needs a layout with two attention modules per layer",
}


@dataclass
class HeadLayout:
    """The attention heads of a loaded model: counts and the output-projection modules.

    ``n_layers x n_heads`` query heads, ``n_kv_heads`` key/value heads per layer (equal to
    ``n_heads`` without grouped-query attention), each head ``head_dim`` wide.
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

    @property
    def n_total(self) -> int:
        """Number of maskable heads, ``n_layers * n_heads``."""
        return self.n_layers * self.n_heads

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_heads)``, the shape of a :class:`~attnprune.heads.HeadMask`."""
        return (self.n_layers, self.n_heads)

    def attention_module(self, layer: int) -> nn.Module:
        """The module that holds the output projection of ``layer`` (its q/k/v live there too)."""
        module = self.layer_modules[layer]
        for part in self.out_proj_path.split(".")[:-1]:
            module = getattr(module, part)
        return module

    def describe(self) -> dict:
        """JSON-ready summary (no modules)."""
        return {
            "model_type": self.model_type,
            "layers": self.n_layers,
            "heads_per_layer": self.n_heads,
            "kv_heads_per_layer": self.n_kv_heads,
            "head_dim": self.head_dim,
            "total_heads": self.n_total,
            "grouped_query_attention": self.n_kv_heads != self.n_heads,
            "out_proj": f"{self.layers_path}.<layer>.{self.out_proj_path}",
        }


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
    layers = _get(model, adapter.layers)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) != n_layers:
        return None
    projs = [_get(layer, adapter.out_proj) for layer in layers]
    if any(p is None or not hasattr(p, "weight") for p in projs):
        return None
    return list(layers), projs


def head_layout(model: nn.Module) -> HeadLayout:
    """Derive the :class:`HeadLayout` of a loaded causal LM.

    Raises :class:`~attnprune.errors.ModelLoadError` when the architecture cannot be mapped.
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
    candidates += [(k, a) for k, a in ADAPTERS.items() if k != model_type]
    for _, adapter in candidates:
        found = _resolve(model, adapter, n_layers)
        if found is None:
            _refuse_hybrid(model, adapter, n_layers, model_type)
            continue
        layer_modules, projs = found
        widths = [projection_in_features(p) for p in projs]
        width = widths[0]
        if width % n_heads:
            continue
        if len(set(widths)) > 1:
            odd = next(i for i, w in enumerate(widths) if w != width)
            raise ModelLoadError(
                f"Model type '{model_type}' has attention output projections of different widths (layer 0: {width}, "
                f"layer {odd}: {widths[odd]} inputs), i.e. per-layer head counts or head widths, which attnprune "
                "does not mask yet; a uniform mask over its layers would zero the wrong columns.")
        return HeadLayout(
            model_type=model_type,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            head_dim=width // n_heads,
            layers_path=adapter.layers,
            out_proj_path=adapter.out_proj,
            out_projs=projs,
            layer_modules=layer_modules,
        )
    tried = sorted({f"{a.layers}.<i>.{a.out_proj}" for a in ADAPTERS.values()})
    raise ModelLoadError(
        f"Could not find the attention output projections of model type '{model_type}' "
        f"(looked for {', '.join(tried)}); add its paths to attnprune.models.layouts.ADAPTERS."
    )


def _refuse_hybrid(model: nn.Module, adapter: ArchAdapter, n_layers: int, model_type: str) -> None:
    """Refuse in one sentence a model whose adapter path exists in some layers only (attention-free layers)."""
    layers = _get(model, adapter.layers)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) != n_layers:
        return
    have = [i for i, layer in enumerate(layers) if _get(layer, adapter.out_proj) is not None]
    if 0 < len(have) < n_layers:
        raise ModelLoadError(
            f"Model type '{model_type}' is a hybrid: {len(have)} of its {n_layers} layers have attention "
            f"({adapter.layers}.<i>.{adapter.out_proj}) and the others have none; attnprune does not mask hybrids "
            "yet (it needs a layout that skips the attention-free layers).")


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
