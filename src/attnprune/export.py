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
from attnprune.heads import HeadMask, apply_mask, check_fits, probe_ids
from attnprune.machine import code_version
from attnprune.models.layouts import HeadLayout, projection_input_axis
from attnprune.results import Front, FrontPoint

MASK_FILE = "attnprune_mask.json"


@torch.no_grad()
def bake_mask(layout: HeadLayout, mask: HeadMask) -> list[tuple[torch.nn.Parameter, tuple, torch.Tensor]]:
    """Zero the pruned heads' input slices of the output projections in place.

    Returns ``(weight, index, original values)`` triples so that :func:`unbake` can undo it.
    """
    saved = []
    for layer, head in mask.pruned:
        proj = layout.out_projs[layer]
        axis = projection_input_axis(proj)
        sl = [slice(None)] * 2
        sl[axis] = layout.head_slice(layer, head)
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
    card: str | None = None,
) -> Path:
    """Write ``model`` with ``mask`` baked in to ``out_dir`` (safetensors, config, tokenizer, ``README.md`` card).

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
            "attnprune_code": code_version(),  # with the commit, when it ran from a git checkout
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "base_model": model_name,
            "method": "zeroed output-projection input slices (exact head removal)",
            **(provenance or {}),
        },
    }
    check_fits(mask, layout)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ids = probe_ids(model, 8, next(model.parameters()).device)
    with torch.no_grad(), apply_mask(model, layout, mask):
        masked = model(input_ids=ids).logits
    saved = bake_mask(layout, mask)
    had_attr = hasattr(model.config, "attnprune")
    try:
        with torch.no_grad():
            baked = model(input_ids=ids).logits
        scale = max(1.0, float(masked.abs().max()))
        if float((baked - masked).abs().max()) > 1e-4 * scale:
            raise UserError(f"The baked weights do not reproduce the masked model on this architecture ({layout.model_type}:"
                            f" logits differ by {float((baked - masked).abs().max()):.2g}); nothing was exported.")
        model.config.attnprune = record
        model.save_pretrained(tmp)
    finally:
        unbake(saved)
        if not had_attr and hasattr(model.config, "attnprune"):
            del model.config.attnprune
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / MASK_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if card is not None:
        (tmp / "README.md").write_text(card)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


TAGS = ["attnprune", "attention-head-pruning", "bias-mitigation", "fairness"]


def _metric(kind: str, name: str, value: float) -> dict:
    return {"type": kind, "name": name, "value": round(float(value), 4)}


def model_index(name: str, report) -> list[dict]:
    """``model-index`` results (Hugging Face card metadata) of a repair's TEST-split numbers."""
    t = report.test.search_measure
    bi, pi = t.setup.bias_inputs, t.setup.perplexity_inputs
    results = [
        {"task": {"type": "text-generation", "name": "social bias"},
         "dataset": {"type": "holistic_bias", "name": f"HolisticBias v1.1, {bi['axis']}, test split, "
                                                    f"{bi['prompts']} prompts, seed {bi['prompt_seed']}"},
         "metrics": [_metric(f"{t.setup.bias_measure}_bias", f"{t.setup.bias_measure} bias (lower is fairer)",
                             t.repaired.bias)]},
        {"task": {"type": "text-generation", "name": "language modelling"},
         "dataset": {"type": "wikitext", "name": f"{pi['corpus']} {pi['split']}, {pi['tokens_scored']} tokens"},
         "metrics": [_metric("perplexity", "perplexity (256-token windows)", t.repaired.perplexity)]},
    ]
    for measure, c in report.test.checks.items():
        inputs = c.setup.bias_inputs
        results.append({
            "task": {"type": "text-generation", "name": "social bias"},
            "dataset": {"type": measure, "name": f"{measure}, {inputs.get('bias_type')}, test split, "
                                                  f"{inputs.get('pairs', inputs.get('items'))} items"},
            "metrics": [_metric(k, k, v["repaired"]) for k, v in c.statistics.items() if k != "bias"]})
    return [{"name": name, "results": results}]


def front_card_lines(point: FrontPoint, front: Front, mask: HeadMask) -> list[str]:
    """The card's numbers for a point of a repair's front (``attnprune front``): its budget, guards and data."""
    k = point.chosen.confirmed
    conf = front.confirmation
    pi = conf.setup.perplexity_inputs
    u = conf.unrepaired
    lines = [
        f"## Chosen at a perplexity budget of +{100 * point.budget:g}% (a point of a front of repaired models)", "",
        f"The repair's selection rule at this budget, on the validation evaluations of `{front.run}` (its search "
        f"aimed at +{100 * front.search_budget:g}%). Guards (other axes or benchmarks that must not get worse): "
        + front.guard_words() + ".", "",
        f"Confirmation data ({conf.setup.prompts} fresh validation prompts, axis {conf.setup.bias_inputs.get('axis')}; "
        f"{pi.get('tokens_scored')} tokens of {pi.get('corpus')} {pi.get('split')}):", "",
        "| model | bias | 95% CI | perplexity change |", "|---|---|---|---|",
        f"| unrepaired | {u.bias:.3f} | [{u.ci[0]:.3f}, {u.ci[1]:.3f}] | - |",
        f"| this model | {k.bias:.3f} | [{k.ci[0]:.3f}, {k.ci[1]:.3f}] | {100 * k.perplexity_change:+.1f}% "
        f"(one-sided {100 * front.confidence:.0f}% bound {100 * k.perplexity_change_bound:+.1f}%) |", ""]
    test = (front.test or {}).get(mask.key)
    if test:
        ch = test.bias_change
        lines += [f"On the held-out TEST split: bias {test.unrepaired_bias:.3f} -> {test.bias:.3f} "
                  f"({100 * ch.relative:+.1f}%, paired 95% CI of the change [{ch.ci[0]:+.3f}, {ch.ci[1]:+.3f}]), "
                  f"perplexity change {100 * test.perplexity_change:+.1f}%.", ""]
    else:
        lines += ["These are validation numbers; the held-out test split was not measured for this point (`attnprune "
                  "front RUN_DIR --test` measures it).", ""]
    return lines


def model_card(mask: HeadMask, model_name: str, base_model: str | None = None, license: str = "other",
               report=None, command: str | None = None, front_point: tuple[FrontPoint, Front] | None = None,
               total_heads: int | None = None) -> str:
    """A Hugging Face model card (``README.md``) for a repaired model.

    YAML front matter (base model, license, tags, ``model-index`` with the TEST-split
    numbers of ``report``, a :class:`~attnprune.results.RepairReport`), then the pruned
    heads, the before/after table with confidence intervals and what it was measured on,
    the command that made it, and the limits.
    """
    import yaml

    name = f"{model_name.split('/')[-1]}-attnprune"
    meta = {"license": license, "library_name": "transformers", "pipeline_tag": "text-generation", "tags": TAGS}
    if base_model:
        meta["base_model"] = base_model
    if report is not None:
        meta["model-index"] = model_index(name, report)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"`{model_name}` with {mask.n_pruned} of {total_heads or mask.shape[0] * mask.shape[1]} attention heads pruned by "
             "[attnprune](https://pypi.org/project/attnprune/) to reduce social bias. A head is removed by zeroing its "
             "slice of the attention output projection's input, so this is a standard checkpoint: it loads with plain "
             "`transformers` (`AutoModelForCausalLM.from_pretrained`) and computes exactly what the masked model "
             "computes. Its `config.json` records the mask and provenance under `attnprune`.", "",
             f"Pruned heads [layer, head]: {[list(p) for p in mask.pruned]}", ""]
    if report is not None:
        t = report.test.search_measure
        bi, pi = t.setup.bias_inputs, t.setup.perplexity_inputs
        u, r, ch = t.unrepaired, t.repaired, t.bias_change
        lines += [
            "## Before and after (held-out TEST split; the search and the choice used the validation split only)", "",
            f"{t.setup.bias_measure} bias on HolisticBias v1.1 {bi['axis']} ({bi['prompts']} test prompts, seed "
            f"{bi['prompt_seed']}); perplexity on {pi['corpus']} {pi['split']} ({pi['tokens_scored']} tokens).", "",
            "| model | bias | 95% CI | perplexity |", "|---|---|---|---|",
            f"| {model_name} | {u.bias:.3f} | [{u.ci[0]:.3f}, {u.ci[1]:.3f}] | {u.perplexity:.2f} |",
            f"| this model | {r.bias:.3f} | [{r.ci[0]:.3f}, {r.ci[1]:.3f}] | {r.perplexity:.2f} |", "",
            f"Bias change {100 * ch.relative:+.1f}% (paired 95% CI of the absolute change [{ch.ci[0]:+.3f}, "
            f"{ch.ci[1]:+.3f}]); perplexity change {100 * t.perplexity_change:+.1f}%.", ""]
        from attnprune.report import check_lines

        lines += check_lines(report.test.checks)
    elif front_point is not None:
        lines += front_card_lines(*front_point, mask)
    else:
        lines += ["No measurements were attached to this export: measure it with `attnprune evaluate --mask "
                  "attnprune_mask.json --split test --bias likelihood,crows_pairs,stereoset`.", ""]
    if command:
        lines += ["## How it was made", "", "```bash", command, "```", ""]
    lines += [
        "## Limits", "",
        "- Bias numbers measure the behaviours named above on the data named above, nothing more; a lower value on "
        "one axis can come with a higher one on another (see the report's transfer axes).",
        "- The HolisticBias `likelihood` measure reads the next-token odds of two fixed word lists, a proxy for the "
        "toxicity of generated text. CrowS-Pairs and StereoSet are small (about 200 test items per bias type) and "
        "have known annotation problems.",
        "- Perplexity was measured on non-overlapping 256-token windows (offline: WikiText sentences without "
        "punctuation), so values are higher than sliding-window perplexity.", "",
        "## Evaluate it with lm-evaluation-harness", "", "```bash",
        "pip install \"lm-eval[hf]\"", "lm_eval --model hf --model_args pretrained=PATH_TO_THIS_DIRECTORY \\",
        "    --tasks crows_pairs_english_gender,wikitext --batch_size 8", "```", "",
        "Both tasks need the Hugging Face hub; lm-eval's `crows_pairs_english_gender` reads a revised English set "
        "(`jannalu/crows_pairs_multilingual`), not the 262 gender pairs of the original CSV measured above, so "
        "expect values within the CIs, not identical numbers.", ""]
    return "\n".join(lines)
