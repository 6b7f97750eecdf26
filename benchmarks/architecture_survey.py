"""Every causal-LM architecture of the installed transformers, as a tiny random model: exact, refused or unbuildable.

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the default config is shrunk
(2-4 layers, 4 heads of 16, small vocabulary and experts) and the model built from it. Then:

- ``exact``: the layout is found, the load-time self-check passes, masking 3 random masks
  gives the same logits as an independent reference (a pre-hook of this script zeroing the
  heads' slices of the output projection's input) and the exported (baked) weights give the
  masked logits;
- ``refused``: attnprune refuses it in one sentence (the sentence is recorded);
- ``not buildable``: the tiny config cannot be built or run (the reason is recorded);
- ``WRONG``: masking or export disagrees with the reference. This must never happen.

    .venv/bin/python benchmarks/architecture_survey.py        # a few minutes on 2 cores

Writes ``benchmarks/results/architecture_survey.json`` and ``.md``. The slow test
``tests/test_architectures.py`` runs the same survey and fails on any ``WRONG``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

SMALL = dict(num_hidden_layers=4, n_layer=4, n_layers=4, num_layers=4, hidden_size=64, n_embd=64, d_model=64,
             num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, ffn_dim=128, n_inner=128, vocab_size=256, max_position_embeddings=128,
             n_positions=128, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1, kv_lora_rank=16,
             q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, rotary_dim=8,
             sliding_window=16, attention_chunk_size=16, first_k_dense_replace=1, num_global_experts=4)


# per-layer variety the generic shrinking would lose: each layer kind of the full model in the tiny one
TWEAKS = {
    "laguna": {"num_attention_heads_per_layer": [4, 8, 4, 8]},
    # multi-head latent attention: value heads (16) wider than the rope part of the query heads (8)
    **{t: {"num_key_value_heads": 4, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8}
       for t in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "axk1", "axk2")},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "gemma4_text": {"layer_types": ["sliding_attention", "full_attention"] * 2,
                    "per_layer_config": {"01": {"head_dim": 32}, "03": {"head_dim": 32}},
                    "vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16},
}


def keep_every_kind(values: list, depth: int) -> list:
    """``values`` cut to ``depth`` entries, each distinct value of the full list kept at least once (when it fits)."""
    out = list(values[:depth])
    missing = [v for v in dict.fromkeys(map(repr, values)) if v not in map(repr, out)]
    by_repr = {repr(v): v for v in values}
    for i, key in enumerate(missing[:depth - 1]):
        out[depth - 1 - i] = by_repr[key]
    return out


MAX_PARAMETERS = 20_000_000
SECONDS_PER_TYPE = 120


def tiny_config(model_type: str):
    """The default config of ``model_type``, shrunk (per-layer lists cut to the new depth)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type]()
    text = getattr(cfg, "text_config", None) or cfg
    for target in {id(cfg): cfg, id(text): text}.values():
        depth_before = getattr(target, "num_hidden_layers", None)
        for key, value in SMALL.items():
            try:
                if key in target.to_dict() or hasattr(target, key):
                    setattr(target, key, value)
            except Exception:  # properties and per-layer attributes some configs refuse
                pass
        depth = getattr(target, "num_hidden_layers", 4)
        for key, value in list(vars(target).items()):
            if isinstance(value, list) and depth_before and len(value) == depth_before and depth_before != depth:
                try:
                    setattr(target, key, keep_every_kind(value, depth))
                except Exception:
                    pass
        for key, value in TWEAKS.get(model_type, {}).items():
            setattr(target, key, value)
    for target in (cfg, text):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(target, name, None)
            if isinstance(value, int) and value >= 256:
                setattr(target, name, 1)
    return cfg


def projection_width(proj) -> int:
    """Input width of an output projection, read from its weight (``nn.Linear`` or GPT-2's Conv1D)."""
    return proj.weight.shape[1] if isinstance(proj, torch.nn.Linear) else proj.weight.shape[0]


def describe(layout) -> str:
    """``rows x heads heads of width(s), path``, and which model layers the rows are in a hybrid."""
    widths = "/".join(str(d) for d in sorted(set(layout.head_dims)))
    counts = "/".join(str(h) for h in sorted(set(layout.row_heads)))
    text = f"{layout.n_layers} x {counts} heads of {widths}, {layout.layers_path}.<i>.{layout.out_proj_path}"
    if layout.is_hybrid:
        text += f" (attention in layers {','.join(map(str, layout.layer_ids))} of {layout.n_model_layers})"
    return text


def module_heads(model, layout, row: int) -> int:
    """Query heads of mask row ``row`` as its attention module reshapes them (its own count), else the config's."""
    attn = layout.attention_module(row)
    # a differential head (DiffLlama) group-norms two query heads' outputs together: its slice is the norm's width
    norm = getattr(attn, "groupnorm", None)
    pair = 2 if norm is not None and tuple(norm.normalized_shape) == (2 * attn.head_dim,) else 1
    for name in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        value = getattr(attn, name, None)
        if isinstance(value, int) and value > 0:
            return value // pair
    config = getattr(model.config, "text_config", None) or model.config
    return int(config.num_attention_heads) // pair


def reference_logits(model, layout, mask, ids) -> torch.Tensor:
    """Logits with the pruned heads' slices of each output projection's input zeroed by this script's own hooks."""
    handles = []
    for layer, proj in enumerate(layout.out_projs):
        heads = [h for (l, h) in mask.pruned if l == layer]
        if not heads:
            continue
        # from the modules themselves, not from the layout under test
        d = projection_width(proj) // module_heads(model, layout, layer)

        def hook(module, args, heads=heads, d=d):
            x = args[0].clone()
            for h in heads:
                x[..., h * d:(h + 1) * d] = 0
            return (x, *args[1:])

        handles.append(proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def survey_one(model_type: str) -> dict:
    """Build, lay out, mask and export one architecture; its group and the reason."""
    import transformers as T

    from attnprune.errors import UserError
    from attnprune.export import bake_mask, unbake
    from attnprune.heads import apply_mask, check_masking
    from attnprune.methods.samplers import random_masks
    from attnprune.models.layouts import head_layout

    t = time.perf_counter()
    try:
        torch.manual_seed(0)
        cfg = tiny_config(model_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):  # size it first: a config the shrinking missed can be gigabytes
                size = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(cfg).parameters())
            if size > MAX_PARAMETERS:
                raise ValueError(f"the shrunk config still has {size:,} parameters")
            model = T.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "emb" not in name:
                    p.normal_(0, 0.2)
        ids = (torch.arange(10) * 7 % 200 + 3)[None]
        with torch.no_grad():
            model(input_ids=ids)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign config counts as "not buildable"
        return {"model_type": model_type, "group": "not buildable",
                "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    try:
        layout = head_layout(model)
        check_masking(model, layout)
    except UserError as exc:
        return {"model_type": model_type, "group": "refused", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001
        return {"model_type": model_type, "group": "WRONG", "reason": f"crash: {type(exc).__name__}: {exc}"[:300]}
    worst_mask = worst_export = 0.0
    try:
        for mask in random_masks(3, layout.shape, 0.1, 0.5, seed=1, heads=layout.heads)[1:]:
            ref = reference_logits(model, layout, mask, ids)
            with torch.no_grad(), apply_mask(model, layout, mask):
                masked = model(input_ids=ids).logits
            saved = bake_mask(layout, mask)
            try:
                with torch.no_grad():
                    baked = model(input_ids=ids).logits
            finally:
                unbake(saved)
            scale = max(1.0, float(ref.abs().max()))
            worst_mask = max(worst_mask, float((masked - ref).abs().max()) / scale)
            worst_export = max(worst_export, float((baked - masked).abs().max()) / scale)
    except Exception as exc:  # noqa: BLE001
        return {"model_type": model_type, "group": "WRONG", "reason": f"crash: {type(exc).__name__}: {exc}"[:300]}
    exact = worst_mask < 1e-4 and worst_export < 1e-4
    return {"model_type": model_type, "group": "exact" if exact else "WRONG",
            "layout": describe(layout),
            "max_relative_difference": {"mask_vs_reference": worst_mask, "export_vs_mask": worst_export},
            "seconds": time.perf_counter() - t}


def survey(model_types=None) -> list[dict]:
    """Every causal-LM model type (or ``model_types``), surveyed."""
    import transformers as T
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    T.logging.set_verbosity_error()
    return [_timed(m) for m in (model_types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))]


def _timed(model_type: str) -> dict:
    """:func:`survey_one` within :data:`SECONDS_PER_TYPE` (a type that hangs is "not buildable")."""
    import signal

    def expire(signum, frame):
        raise TimeoutError(f"building and running the tiny model took over {SECONDS_PER_TYPE} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(SECONDS_PER_TYPE)
    try:
        return survey_one(model_type)
    except TimeoutError as exc:
        return {"model_type": model_type, "group": "not buildable", "reason": str(exc)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def markdown(rows: list[dict]) -> str:
    import transformers as T

    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    lines = [f"# Architectures of transformers {T.__version__} (causal-LM auto mapping, {len(rows)} model types)", "",
             ", ".join(f"{g}: {len(v)}" for g, v in sorted(groups.items())), ""]
    for group in ("WRONG", "exact", "refused", "not buildable"):
        if group not in groups:
            continue
        lines += [f"## {group}", "", "| model type | detail |", "|---|---|"]
        for r in groups[group]:
            detail = r.get("layout") or r.get("reason", "")
            lines.append(f"| {r['model_type']} | {detail.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from common import RESULTS, write

    rows = survey(sys.argv[1:] or None)
    write("architecture_survey", {"rows": rows})
    (RESULTS / "architecture_survey.md").write_text(markdown(rows) + "\n")
    counts = {}
    for r in rows:
        counts[r["group"]] = counts.get(r["group"], 0) + 1
    print(counts)


if __name__ == "__main__":
    main()
