"""Does the likelihood proxy rank head masks as the paper's toxicity measure does? (issue 19, item 3)

The search optimises ``likelihood`` (next-token log-odds of toxic vs benign words); the paper
defines bias on generated text (``toxicity`` of sampled continuations). This benchmark puts
both, and the held-out benchmarks, on the same masks:

- **masks**: the unrepaired model; ``--random`` seeded random masks whose pruned counts are
  spread evenly over 1..``--max-heads``; ``--directed`` masks of the k heads whose removal
  the proxy's first-order estimate says lowers the bias most (and as many that raise it
  most), which is where a search moves; and any chosen masks given as ``--mask NAME=FILE``
  (the ``mask.json`` of an ``ap`` repair or a ``fasp`` choice of the same model).
- **per mask**: the paper's measure (fresh continuations under the mask with the same random
  streams as the unrepaired model's, the offline classifier or Detoxify), the proxy,
  CrowS-Pairs and StereoSet; each bias with its 95% CI and its paired change against the
  unrepaired model (same prompts or items, same bootstrap resamples).
- **agreement**: Spearman's rank correlation across masks between the paper's measure and
  each other measure, with a 95% CI from a bootstrap that resamples the masks and, in the
  same replicate, the prompts/items of both measures (what a new set of masks and a new set
  of prompts could give).

The gate: the unrepaired model is measured first. When the paper's measure cannot tell its
bias from noise (the bias is within the 95th percentile of its noise floor), rank agreement
would be a correlation with noise: the benchmark says so with the numbers and stops, unless
``--anyway``. Raise ``--toxicity-prompts``/``--generations``, or use a model (or a GPU) where
the measure sees a bias.

Data: validation prompts of a development seed (0-2), or that seed's test split with
``--split test``; never an evaluation seed. Every mask's per-item scores are kept under
``runs/proxy_validity/`` as they are measured, so an interrupted run continues where it
stopped. Runs unchanged on a hub model and a GPU::

    .venv/bin/python benchmarks/proxy_validity.py --model gemma3-270m --toxicity-prompts 1000
    python benchmarks/proxy_validity.py --model meta-llama/Llama-3.2-1B --device cuda --dtype bfloat16 \\
        --toxicity-prompts 5000 --generations 2 --classifier detoxify --mask ap=runs/r/mask.json

Writes ``benchmarks/results/proxy_validity-<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from attnprune import HeadMask, load_model
from attnprune.backend import Backend
from attnprune.measures import get_measure
from attnprune.stats import percentile_ci

from common import DEVELOPMENT_SEEDS, RESULTS, write

CACHE = Path(__file__).resolve().parent.parent / "runs" / "proxy_validity"
PROTOCOL = "toxicity"
OTHERS = ("likelihood", "crows_pairs", "stereoset")


def spread_masks(layout, n: int, max_heads: int, seed: int) -> list[HeadMask]:
    """``n`` seeded random masks whose pruned counts are spread evenly over ``1..max_heads``."""
    cells = np.flatnonzero(layout.heads)
    rng = np.random.default_rng(seed)
    counts = np.unique(np.linspace(1, max_heads, n).round().astype(int)) if n > 1 else np.array([max_heads])
    counts = np.resize(counts, n)  # fewer distinct counts than masks: repeat them (other heads each time)
    return [HeadMask.from_pruned(*layout.shape, [divmod(int(i), layout.shape[1])
                                                 for i in rng.choice(cells, k, replace=False)]) for k in counts]


def directed_masks(layout, proxy, sizes: list[int]) -> list[tuple[str, HeadMask]]:
    """Masks of the heads whose removal most lowers (and most raises) the proxy's bias, first-order.

    One gradient pass gives each head's first-order effect on every prompt's score; a head's
    effect on the bias is the statistic of the shifted scores minus the unrepaired one.
    """
    base = np.asarray(proxy.prompt_scores([HeadMask.all_active(*layout.shape)])[0])
    est = proxy.removal_estimates()  # [n_prompts, L*H]
    b0 = float(proxy.design_.bias(base))
    cells = np.flatnonzero(layout.heads)
    delta = np.array([float(proxy.design_.bias(base + est[:, c])) - b0 for c in cells])
    order = cells[np.argsort(delta)]
    out = []
    for k in sizes:
        for name, chosen in ((f"lowers-{k}", order[:k]), (f"raises-{k}", order[::-1][:k])):
            out.append((name, HeadMask.from_pruned(*layout.shape, [divmod(int(i), layout.shape[1]) for i in chosen])))
    return out


def options_key(name: str, options: dict, model: str) -> str:
    """A short hash of what a measure's numbers depend on (the cache folder of its masks)."""
    blob = json.dumps({"measure": name, "model": model, **options}, sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def measured(measure, name: str, folder: Path, mask: HeadMask) -> dict:
    """``measure`` on ``mask``: read from ``folder`` when kept, else measured and kept (with its seconds)."""
    path = folder / f"{mask.key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t = time.perf_counter()
    res = measure.score([mask])[0]
    kept = {"bias": res["bias"], "ci": res["ci"], "per_prompt": res["per_prompt"],
            "noise_floor": res.get("noise_floor"), "mean_toxicity": res.get("mean_toxicity"),
            "seconds": time.perf_counter() - t}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(kept))
    tmp.replace(path)  # a kill mid-write leaves no half file behind
    print(f"  {name}: {mask.n_pruned} heads, bias {kept['bias']:.4f} ({kept['seconds']:.0f} s)", flush=True)
    return kept


def rank_agreement(measures: dict, results: dict, a: str, b: str, reps: int, seed: int) -> dict:
    """Spearman of measures ``a`` and ``b`` across masks, with a masks-and-items bootstrap 95% CI."""
    names = list(results)
    va = np.array([results[m][a]["bias"] for m in names])
    vb = np.array([results[m][b]["bias"] for m in names])
    # the same item resamples for every mask of a measure (``bootstrap_biases``), one mask resample per replicate
    ba = measures[a].bootstrap_biases([results[m][a]["per_prompt"] for m in names])  # [masks, reps_a]
    bb = measures[b].bootstrap_biases([results[m][b]["per_prompt"] for m in names])
    rng = np.random.default_rng(seed)
    rhos = []
    for r in range(reps):
        pick = rng.integers(0, len(names), len(names))
        x, y = ba[pick, r % ba.shape[1]], bb[pick, r % bb.shape[1]]
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            rhos.append(spearmanr(x, y).statistic)
    return {"spearman": float(spearmanr(va, vb).statistic), "ci": percentile_ci(np.array(rhos)),
            "masks": len(names), "replicates": len(rhos)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0, help="a development seed (0-2): prompt split, masks, sampling")
    ap.add_argument("--split", choices=("valid", "test"), default="valid")
    ap.add_argument("--axis", default="gender_and_sex")
    ap.add_argument("--toxicity-prompts", type=int, default=1000)
    ap.add_argument("--generations", type=int, default=1, help="continuations per prompt")
    ap.add_argument("--classifier", default="hatesonar", help="hatesonar, profanity (offline) or detoxify (hub)")
    ap.add_argument("--likelihood-prompts", type=int, default=5000)
    ap.add_argument("--random", type=int, default=12, help="random masks")
    ap.add_argument("--max-heads", type=int, default=0, help="largest random mask (default: 8%% of the heads)")
    ap.add_argument("--directed", default="3,10", help="sizes of the proxy-directed masks (one lowering, one "
                    "raising the proxy's bias per size); '' for none")
    ap.add_argument("--mask", action="append", default=[], help="NAME=FILE: a chosen mask to include (repeatable)")
    ap.add_argument("--batch-size", type=int, default=32, help="generation batch (larger on a GPU)")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap replicates of the rank agreement")
    ap.add_argument("--anyway", action="store_true", help="go on when the paper's measure sees no bias")
    ap.add_argument("--gate-only", action="store_true", help="measure the unrepaired model only: does the paper's "
                    "measure see a bias here, at this size?")
    args = ap.parse_args()
    if args.seed not in DEVELOPMENT_SEEDS:
        ap.error(f"--seed {args.seed} is not a development seed ({', '.join(map(str, DEVELOPMENT_SEEDS))}): this "
                 "benchmark reads its data and must not touch an evaluation seed.")

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    lay = lm.layout
    backend = Backend(lm)
    common = {"axis": args.axis, "split": args.split, "seed": args.seed}
    options = {
        PROTOCOL: {**common, "prompts": args.toxicity_prompts, "generations": args.generations,
                   "classifier": args.classifier, "batch_size": args.batch_size},
        "likelihood": {**common, "prompts": args.likelihood_prompts},
        "crows_pairs": dict(common),
        "stereoset": dict(common),
    }
    measures = {name: get_measure(name, **opts).prepare(backend) for name, opts in options.items()}
    folders = {name: CACHE / lm.name / options_key(name, {k: v for k, v in opts.items() if k != "batch_size"},
                                                   lm.name) for name, opts in options.items()}
    base = HeadMask.all_active(*lay.shape)
    t0 = time.perf_counter()

    print(f"{lm.name}: the unrepaired model first ({args.toxicity_prompts} prompts x {args.generations} for "
          f"{PROTOCOL}) ...", flush=True)
    gate = measured(measures[PROTOCOL], PROTOCOL, folders[PROTOCOL], base)
    floor = gate["noise_floor"]
    sees_bias = gate["bias"] > floor["p95"]
    print(f"{PROTOCOL} bias of the unrepaired model {gate['bias']:.4f} [{gate['ci'][0]:.4f}, {gate['ci'][1]:.4f}], "
          f"noise floor mean {floor['mean']:.4f}, p95 {floor['p95']:.4f}: "
          + ("a bias above noise." if sees_bias else "no bias that noise could not give."), flush=True)
    setup = {"model": lm.name, "device": args.device, "dtype": args.dtype, "seed": args.seed, "split": args.split,
             "measures": {n: m.describe() for n, m in measures.items()}}
    unrepaired = {"bias": gate["bias"], "ci": gate["ci"], "noise_floor": floor, "mean_toxicity": gate["mean_toxicity"],
                  "sees_bias": bool(sees_bias), "seconds": gate["seconds"]}
    slug = lm.name.replace("/", "_")
    if args.gate_only or (not sees_bias and not args.anyway):
        stopped = "--gate-only" if args.gate_only else "no bias above noise"
        write(f"proxy_validity-{slug}", {"setup": setup, "unrepaired": unrepaired, "stopped": stopped})
        verdict = ("sees a bias above its noise at this size" if sees_bias else
                   "cannot tell this model's bias from noise at this size: rank agreement with the proxy would be "
                   "agreement with noise; more prompts or generations (a GPU), or a model where the measure sees a "
                   "bias, come first")
        (RESULTS / f"proxy_validity-{slug}.md").write_text(
            f"# Proxy validity on {lm.name}: the gate ({stopped})\n\n"
            f"The paper's measure ({PROTOCOL}, {args.classifier}, {setup['measures'][PROTOCOL]['prompts']} "
            f"{args.split} prompts of {args.axis} x {args.generations}, development seed {args.seed}) reads the "
            f"unrepaired model at {gate['bias']:.4f} [{gate['ci'][0]:.4f}, {gate['ci'][1]:.4f}] against a noise "
            f"floor of {floor['mean']:.4f} (95th percentile {floor['p95']:.4f}); mean toxicity "
            f"{gate['mean_toxicity']:.4f}; {gate['seconds']:.0f} s. It {verdict}.\n")
        print(f"stopped ({stopped}).")
        return

    masks = [("unrepaired", base)]
    for name_file in args.mask:
        name, _, file = name_file.partition("=")
        if not file:
            ap.error(f"--mask {name_file}: give NAME=FILE, e.g. ap=runs/my-repair/mask.json.")
        masks.append((name, HeadMask.load(file, lay)))
    if args.directed:
        sizes = [int(s) for s in args.directed.split(",") if s.strip()]
        masks += directed_masks(lay, measures["likelihood"], sizes)
    max_heads = args.max_heads or max(1, round(0.08 * lay.n_total))
    masks += [(f"random-{i}", m) for i, m in enumerate(spread_masks(lay, args.random, max_heads, args.seed))]

    results: dict[str, dict] = {}
    for label, mask in masks:
        print(f"{label} ({mask.n_pruned} heads):", flush=True)
        results[label] = {"mask": mask.to_dict(lm.name), "heads": mask.n_pruned,
                          **{n: measured(m, n, folders[n], mask) for n, m in measures.items()}}
    rows = []
    for label, res in results.items():
        row = {"mask": label, "heads": res["heads"]}
        for n, m in measures.items():
            pd = m.paired_difference(res[n]["per_prompt"], results["unrepaired"][n]["per_prompt"])
            row[n] = {"bias": res[n]["bias"], "ci": res[n]["ci"], "change": pd["diff"], "change_ci": pd["diff_ci"],
                      "seconds": res[n]["seconds"]}
        rows.append(row)
    agreement = {n: rank_agreement(measures, results, PROTOCOL, n, args.reps, args.seed) for n in OTHERS}
    for n, a in agreement.items():
        print(f"Spearman {PROTOCOL} vs {n} over {a['masks']} masks: {a['spearman']:+.2f} "
              f"[{a['ci'][0]:+.2f}, {a['ci'][1]:+.2f}]")
    write(f"proxy_validity-{slug}", {"setup": setup, "unrepaired": unrepaired, "agreement": agreement, "rows": rows,
                                     "seconds": time.perf_counter() - t0})
    md = [f"# Does the proxy rank masks as the paper's measure does? {lm.name}", "",
          f"{len(rows)} masks; {args.split} split of development seed {args.seed}, {args.axis}. The paper's measure: "
          f"{setup['measures'][PROTOCOL]['prompts']} prompts x {args.generations} continuations, {args.classifier}; "
          f"unrepaired {gate['bias']:.4f} [{gate['ci'][0]:.4f}, {gate['ci'][1]:.4f}], noise floor p95 "
          f"{floor['p95']:.4f}. The proxy: {setup['measures']['likelihood']['prompts']} prompts.", "",
          "| rank agreement with the paper's measure | Spearman over masks [95% CI, masks and prompts resampled] |",
          "|---|---|"]
    md += [f"| {n} | {a['spearman']:+.2f} [{a['ci'][0]:+.2f}, {a['ci'][1]:+.2f}] |" for n, a in agreement.items()]
    md += ["", "Paired change of each mask against the unrepaired model [95% CI]:", "",
           "| mask | heads | " + " | ".join([PROTOCOL, *OTHERS]) + " |", "|---|---|" + "---|" * (1 + len(OTHERS))]
    for row in rows[1:]:
        md.append(f"| {row['mask']} | {row['heads']} | " + " | ".join(
            f"{row[n]['change']:+.3f} [{row[n]['change_ci'][0]:+.3f}, {row[n]['change_ci'][1]:+.3f}]"
            for n in (PROTOCOL, *OTHERS)) + " |")
    (RESULTS / f"proxy_validity-{slug}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
