"""The ``attnprune`` command line: one subcommand per job, flags built from the config dataclasses.

Every error a user can cause ends in one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from attnprune import config as C
from attnprune.errors import UserError

EXIT_USER_ERROR = 2


def _write_json(path: str | None, data: dict) -> None:
    if path:
        out = Path(path)
        if out.is_dir():
            raise UserError(f"--json {out} is a directory; name a file.")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1, default=float) + "\n")
        print(f"wrote {out}")


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------


def cmd_info(cfg: C.InfoConfig) -> None:
    """Print the model's head layout and size."""
    from attnprune.models import count_parameters

    loaded = cfg.load()
    info = {
        "model": loaded.name,
        "class": type(loaded.model).__name__,
        "parameters": count_parameters(loaded.model),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "source": loaded.source,
        "layout": loaded.layout.describe(),
    }
    if cfg.json:
        print(json.dumps(info, indent=1))
        return
    lay, src = info["layout"], info["source"]
    print(f"model       {info['model']} ({info['class']}, {lay['model_type']})")
    print(f"parameters  {info['parameters']:,} ({info['dtype']}, {info['device']})")
    print(f"source      {src.get('kind')}: {src.get('cache') or src.get('path') or src.get('repo_id')}")
    print(f"heads       {loaded.layout.summary()} maskable query heads")
    print(f"kv heads    {lay['kv_heads_per_layer']} per layer" + (" (grouped-query attention)" if lay["grouped_query_attention"] else ""))
    print(f"head dim    {'/'.join(map(str, sorted(set(lay.get('head_dims', [lay['head_dim']])))))}"
          + (" (per layer: " + ", ".join(map(str, lay["head_dims"])) + ")" if "head_dims" in lay else ""))
    print(f"masked at   input of {lay['out_proj']}")


def cmd_evaluate(cfg: C.EvaluateConfig) -> None:
    """Measure bias (with CI) and perplexity of the model, with and without a mask."""
    from attnprune.evaluation import Evaluator
    from attnprune.heads import HeadMask

    loaded = cfg.load()
    masks = [HeadMask.all_active(*loaded.layout.shape)]
    if cfg.mask:
        masks.append(HeadMask.load(cfg.mask, loaded.layout))
    names = ["unrepaired"] + ([f"masked ({masks[1].n_pruned} heads pruned)"] if cfg.mask else [])
    out: dict = {"results": {}}
    t0 = time.perf_counter()
    for i, bias in enumerate(C.split_list(cfg.bias)):
        ev = Evaluator(loaded, bias=bias, bias_options=cfg.bias_options(bias), split=cfg.split,
                       perplexity_options={"max_tokens": cfg.ppl_tokens, "source": cfg.corpus, "seed": cfg.seed},
                       backend_options=cfg.backend_options)
        try:
            results = ev.evaluate(masks, with_perplexity=i == 0)
            setup = ev.setup()
        finally:
            ev.close()
        bi, pi = setup.bias_inputs, setup.perplexity_inputs
        size = next(f"{bi[k]} {k}" for k in ("prompts", "pairs", "items") if k in bi)
        what = f"axis {cfg.axis}" if "axis" in bi else f"bias type {bi.get('bias_type')}"
        print(f"\n{bias} bias, {what}, {cfg.split} split: {size} (seed {cfg.seed})"
              + (f"; perplexity: {pi['corpus']} {pi['split']}, {pi['tokens_scored']} tokens" if i == 0 else ""))
        print(f"{'':28s} {'bias':>8s} {'95% CI':>18s} {'noise floor':>12s} {'corrected SD':>13s}"
              + (f" {'perplexity':>11s}" if i == 0 else ""))
        typed = [r.bias_result for r in results]
        for name, r, d in zip(names, results, typed):
            floor = d.noise_floor
            corrected = (d.noise_corrected or {}).get("between_sd_corrected", float("nan"))
            print(f"{name:28s} {r.bias:8.3f} {_fmt_ci(r.bias_ci):>18s} {floor['mean'] if floor else float('nan'):12.3f}"
                  f" {corrected:13.3f}" + (f" {r.perplexity:11.2f}" if i == 0 else ""))
        for stat in typed[0].statistics:
            print(f"  {stat:26s} " + "  ".join(
                f"{d.statistics[stat]['value']:8.2f} {_fmt_ci(d.statistics[stat]['ci'])}" for d in typed))
        buckets = typed[0].buckets or {}
        if buckets:
            print("\nper bucket (" + ("template-adjusted mean log-odds toxic vs benign" if bias == "likelihood"
                                      else "mean toxicity") + "):")
            for b in buckets:
                vals = [d.buckets[b] for d in typed]
                vals = [v["mean_toxicity"] if isinstance(v, dict) else v for v in vals]
                print(f"  {b:22s} " + "  ".join(f"{v:8.3f}" for v in vals) + f"   (n={bi['buckets'].get(b, 0)})")
        out["results"][bias] = {"setup": setup.to_dict(), "card": ev.bias_measure.card.to_dict(),
                                "masks": [dict(name=n, **r.to_dict()) for n, r in zip(names, results)]}
    print(f"\n{time.perf_counter() - t0:.1f} s (noise floor = bias of the same scores with bucket labels shuffled; "
          "corrected SD = spread of the bucket means less their sampling noise, Lum et al. 2022)")
    out["seconds"] = time.perf_counter() - t0
    _write_json(cfg.json, out)


def cmd_sample(cfg: C.RunConfig) -> None:
    """Evaluate random masks into the run's store (resumable)."""
    from attnprune.methods import MethodContext
    from attnprune.methods.ap import AttentionPruning
    from attnprune.run import Run
    from attnprune.selection import SelectionPolicy

    with Run.open(cfg) as run:
        rows = AttentionPruning().design(MethodContext(run, SelectionPolicy.of(cfg), cfg.seed))
        print(f"{len(rows)} masks of the {cfg.sampler} design evaluated on validation; store {run.store.path} holds "
              f"{run.store.count()} evaluations")


def cmd_fit(cfg: C.FitConfig) -> None:
    """Fit the surrogates from the store alone and print their cross-validated accuracy."""
    from attnprune.methods import MethodContext
    from attnprune.methods.ap import AttentionPruning
    from attnprune.run import Run
    from attnprune.selection import SelectionPolicy

    with Run.from_store(cfg) as run:
        metrics = AttentionPruning().fit(MethodContext(run, SelectionPolicy.of(cfg), cfg.seed)).metrics
    print(f"{cfg.surrogate} surrogates fitted on {metrics['samples']} masks ({metrics['folds']}-fold CV"
          + (" over the multi-head masks; knockouts always in training" if cfg.surrogate == "additive" else "") + "):")
    print(f"{'target':16s} {'model':16s} {'MSE':>9s} {'R^2':>6s} {'Spearman':>9s} {'masks':>6s}")
    rows = [(f"{kind}", t, m) for t, by_kind in metrics["cv"].items() for kind, m in by_kind.items()]
    rows += [(f"{name}", t, m) for name in ("knockouts_only", "cv_inside_budget")
             for t, m in metrics.get(name, {}).items()]
    for kind, target, m in rows:
        print(f"{target:16s} {kind:16s} {m['mse']:9.4f} {m['r2']:6.2f} {m['spearman']:9.2f} {m['n']:6d}")
    _write_json(cfg.json, metrics)


def cmd_search(cfg: C.RunConfig) -> None:
    """Anneal on surrogates fitted from the store; print and save the best candidate masks."""
    import torch

    from attnprune.heads import HeadMask
    from attnprune.methods import MethodContext
    from attnprune.methods.ap import AttentionPruning
    from attnprune.run import Run
    from attnprune.selection import SelectionPolicy

    ap = AttentionPruning()
    with Run.from_store(cfg) as run:
        ctx = MethodContext(run, SelectionPolicy.of(cfg), cfg.seed)
        surrogates = ap.fit(ctx)
        results, bounds = ap.search(ctx, surrogates)
        base = run.base()
        shape, model = run.shape, run.model_name
    res = results[-1]  # annealed under the full budget
    print(f"annealed {sum(r.states_scored for r in results):,} states with {bounds[0]}-{bounds[1]} heads pruned in "
          f"{sum(r.seconds for r in results):.1f} s at {len(results)} budgets up to +{100 * cfg.tau:.1f}%")
    print(f"unrepaired (valid): bias {base.bias:.3f}, perplexity {base.perplexity:.2f}")
    states = res.states[: cfg.top_k]
    pb, plp = surrogates.predict_torch(torch.as_tensor(states.astype("float32")))
    for i, state in enumerate(states):
        m = HeadMask(state.reshape(shape))
        path = m.save(cfg.out_dir / "candidates" / f"candidate{i + 1}.json", model=model,
                      predicted_bias=float(pb[i]), predicted_perplexity=float(torch.exp(plp[i])))
        print(f"  {path}: {m.n_pruned} heads, predicted bias {float(pb[i]):.3f}, perplexity {float(torch.exp(plp[i])):.2f}")


def cmd_repair(cfg: C.RepairConfig) -> None:
    """The whole Attention Pruning repair."""
    from attnprune.repair import repair
    from attnprune.report import perplexity_interval

    result = repair(cfg)
    t = result.report.test.search_measure
    u, r = t.unrepaired, t.repaired
    bi, pi = t.setup.bias_inputs, t.setup.perplexity_inputs
    print(f"\nTEST split: {cfg.bias} bias on {bi['axis']}, {bi['prompts']} prompts (seed {bi['prompt_seed']}); "
          f"perplexity on {pi['corpus']} {pi['split']}, {pi['tokens_scored']} tokens")
    print(f"{'':12s} {'bias':>8s} {'95% CI':>18s} {'perplexity':>11s}")
    for name, s in (("unrepaired", u), ("repaired", r)):
        print(f"{name:12s} {s.bias:8.3f} {_fmt_ci(s.ci):>18s} {s.perplexity:11.2f}")
    ch = t.bias_change
    print(f"bias change {100 * ch.relative:+.1f}% (paired 95% CI of the change [{ch.ci[0]:+.3f}, {ch.ci[1]:+.3f}]),"
          f" perplexity change {100 * t.perplexity_change:+.1f}%{perplexity_interval(t)}, {len(result.mask.pruned)} "
          "heads pruned")
    x = result.report.test.toxicity
    if x is not None:
        print(f"second opinion, toxicity protocol ({x.setup.bias_inputs['classifier']}, "
              f"{x.setup.bias_inputs['prompts']} test prompts): bias {x.unrepaired.bias:.4f} -> "
              f"{x.repaired.bias:.4f} (change CI [{x.bias_change.ci[0]:+.4f}, {x.bias_change.ci[1]:+.4f}])")
    print(f"\nreport: {result.out_dir / 'report.md'}")
    if C.split_list(cfg.budgets):
        budgets = ", ".join(f"+{b}%" for b in C.split_list(cfg.budgets))
        print(f"front at {budgets}: {result.out_dir / 'front.md'} (export a point with "
              f"`attnprune export --from {result.out_dir} --budget B --out DIR`)")
    if result.model_dir:
        print(f"repaired model: {result.model_dir}  (loads with transformers.AutoModelForCausalLM.from_pretrained)")


def cmd_compare(cfg: C.CompareConfig) -> None:
    """Attention Pruning against FASP and simpler baselines over seeds, measured on test."""
    from attnprune.compare import compare

    compare(cfg)
    print()
    print((cfg.out_dir / "comparison.md").read_text())
    print(f"wrote {cfg.out_dir / 'comparison.md'}, comparison.json, comparison.png")


def cmd_pool(cfg: C.PoolConfig) -> None:
    """Several comparisons (seeds run apart) as one table, with the pooled AP-minus intervals."""
    from attnprune.compare import pool, write_comparison

    out = Path(cfg.out)
    write_comparison(pool(cfg.run_list, level=cfg.level), out)
    print()
    print((out / "comparison.md").read_text())
    print(f"wrote {out / 'comparison.md'}, comparison.json, comparison.png")


def cmd_report(cfg: C.ReportConfig) -> None:
    """Rewrite report.md and the plots from a run's report.json."""
    from attnprune.front import read_report
    from attnprune.report import write_report

    out = Path(cfg.run)
    for p in write_report(read_report(out), out).values():
        print(p)


def cmd_front(cfg: C.FrontConfig) -> None:
    """The confirmed, budget-respecting choice at several perplexity budgets, from a finished repair's store."""
    from attnprune.front import front

    front(cfg)
    print()
    print((Path(cfg.run) / "front.md").read_text())
    print(f"wrote {Path(cfg.run) / 'front.md'}, front.json, front.png")


def cmd_export(cfg: C.ExportConfig) -> None:
    """Write a model with a mask baked in (loads with plain transformers)."""
    from attnprune.export import export_repaired, model_card
    from attnprune.heads import HeadMask

    point = None
    if cfg.from_run is not None:
        from attnprune.front import front_point

        point = front_point(Path(cfg.from_run), cfg.budget)  # before loading: a missing point is one sentence
    loaded = cfg.load()
    if point is not None:
        mask = HeadMask.from_dict(point[0].chosen.mask, loaded.layout)
        report, provenance = None, {"front": str(Path(cfg.from_run).resolve()), "budget": point[0].budget}
    else:
        mask = HeadMask.load(cfg.mask, loaded.layout)
        report, provenance = _report_of(mask, Path(cfg.mask).parent), {"mask_file": str(Path(cfg.mask).resolve())}
    card = model_card(mask, loaded.name, loaded.source.get("base_model"), loaded.source.get("license", "other"), report,
                      C.command_line("export", cfg), front_point=point, total_heads=loaded.layout.n_total)
    out = export_repaired(loaded.model, loaded.tokenizer, loaded.layout, mask, cfg.out, model_name=loaded.name,
                          provenance=provenance, card=card)
    print(f"wrote {out} ({mask.n_pruned} heads pruned; model card {out / 'README.md'}"
          + (f" with the measurements of {Path(cfg.mask).parent / 'report.json'})" if report else
             f" with the front's numbers at +{cfg.budget:g}%)" if point else ")"))


def _report_of(mask, run_dir: Path):
    """The repair report beside a mask file, when it is that repair's choice (its numbers go into the card)."""
    from attnprune.results import RepairReport

    path = run_dir / "report.json"
    if not path.is_file():
        return None
    try:
        report = RepairReport.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return report if report.chosen_mask["pruned"] == [list(p) for p in mask.pruned] else None


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------

COMMANDS = (
    ("info", cmd_info, C.InfoConfig, "show a model's attention-head layout"),
    ("evaluate", cmd_evaluate, C.EvaluateConfig, "measure bias (with CI) and perplexity, optionally with a head mask"),
    ("repair", cmd_repair, C.RepairConfig,
     "run the whole Attention Pruning repair (defaults: packaged model, offline, on a CPU)"),
    ("sample", cmd_sample, C.RunConfig, "evaluate random masks into the run's store (resumable)"),
    ("fit", cmd_fit, C.FitConfig, "fit surrogates from the store and print their cross-validated accuracy"),
    ("search", cmd_search, C.RunConfig, "anneal on the surrogates and save the best candidate masks"),
    ("compare", cmd_compare, C.CompareConfig,
     "compare AP with FASP and the baselines over seeds, on one budget; results on the test split"),
    ("pool", cmd_pool, C.PoolConfig,
     "pool several compare runs (seeds run on other machines or at other times) into one table"),
    ("report", cmd_report, C.ReportConfig, "rewrite report.md and plots from a run's report.json"),
    ("front", cmd_front, C.FrontConfig,
     "the confirmed choice at several perplexity budgets, from a finished repair's store (table and plot)"),
    ("export", cmd_export, C.ExportConfig, "write a model with a mask baked into its weights"),
)


class _Parser(argparse.ArgumentParser):
    """argparse, with a flag error in one sentence (and where to get help) instead of a usage block."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"attnprune: error: {message[0].upper() + message[1:]}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (all subcommands)."""
    parser = _Parser(
        prog="attnprune", description="Repair social bias in causal LMs by pruning attention heads."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, func, cls, help_ in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        C.add_config_flags(p, cls)
        p.set_defaults(func=func, config_class=cls, command_parser=p)
    return parser


class _StdoutHandler(logging.StreamHandler):
    """Log lines to whatever ``sys.stdout`` is when they are written (it may be replaced after set-up)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    logger = logging.getLogger("attnprune")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _stop(signum, frame):
    """SIGTERM (a scheduler, `kill`) and SIGINT stop a command the same way: as an interrupt, with its message."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # a process started in the background by a shell ignores SIGINT, so `kill` (SIGTERM) is how it is
    # stopped: end it through the interrupt path (its message; the store has committed every evaluation)
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, _stop)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # refused by the subcommand, so the message names its own --help
            getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, or a flag argparse refused (already printed in one line)
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    _setup_logging()
    try:
        args.func(C.config_from_args(args, args.config_class))
    except UserError as exc:
        print(f"attnprune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except PermissionError as exc:
        # a path that became unwritable after the up-front checks (they probe every output path)
        print(f"attnprune: error: {exc.filename or 'a file'} cannot be written ({exc.strerror}); choose a writable "
              "location (everything evaluated so far is saved in the run's store).", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("attnprune: interrupted; everything evaluated so far is saved in the run's store.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
