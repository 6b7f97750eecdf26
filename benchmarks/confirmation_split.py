"""How a confirmation's seconds split between its bias and its perplexity, on the default model.

A confirmation re-measures a candidate on the confirmation half of validation: the bias on
``--confirm-prompts`` prompts and the perplexity on ``--confirm-ppl-tokens`` tokens. The
choice needs the bias only of a candidate whose perplexity bound holds the budget, so a
confirmation that measured perplexity first could skip the bias of every candidate over the
budget (on evaluation seeds 24-26, 3 to 10 of AP's 6-12 confirmations). This measures what
that would save per skipped bias, side by side in one run: for the unrepaired model (after a
warm-up) and for random masks of ``--heads`` heads, the seconds of the bias alone, of the
perplexity alone and of the whole evaluation, at the repair's default sizes.

Development seed 0, validation data only; nothing here reads a test split.

    .venv/bin/python benchmarks/confirmation_split.py [--masks 3] [--heads 15]

Writes ``benchmarks/results/confirmation_split.json``.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from attnprune import HeadMask, load_model
from attnprune.config import RepairConfig
from attnprune.run import Run
from common import seconds_of, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=int, default=3, help="random masks to time")
    ap.add_argument("--heads", type=int, default=15, help="heads each mask prunes (AP's choices: 13-16)")
    args = ap.parse_args()
    lm = load_model("smollm2-135m")
    L, H = lm.layout.shape
    base = HeadMask.all_active(L, H)
    rng = np.random.default_rng(0)
    masks = [HeadMask.from_pruned(L, H, [divmod(int(c), H) for c in rng.choice(L * H, args.heads, replace=False)])
             for _ in range(args.masks)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="confirmation_split-") as tmp:
        cfg = RepairConfig(out=tmp)
        with Run.open(cfg, loaded=lm, log=lambda s: None) as run:
            ev, _ = run.evaluator(run.confirm_spec)
            ev.evaluate(base)  # warm-up: the unrepaired model's caches
            for label, m in [("unrepaired", base)] + [(f"random {m.n_pruned} heads #{i}", m) for i, m in enumerate(masks)]:
                bias = seconds_of(lambda: ev.bias_measure.score([m]))
                ppl = seconds_of(lambda: ev.ppl_measure.score([m]))
                whole = seconds_of(lambda: ev.evaluate([m]))
                rows.append({"mask": label, "first_pruned_layer": min((l for l, _ in m.pruned), default=None),
                             "bias_seconds": bias, "perplexity_seconds": ppl, "evaluation_seconds": whole,
                             "bias_share": bias / (bias + ppl)})
                print(f"{label}: bias {bias:.1f} s, perplexity {ppl:.1f} s (bias {100 * bias / (bias + ppl):.0f}% of "
                      f"the two), whole evaluation {whole:.1f} s")
            inputs = ev.describe()
    share = float(np.mean([r["bias_share"] for r in rows[1:]]))
    print(f"masks: the bias is {100 * share:.0f}% of a confirmation's seconds on average; a confirmation over the "
          "budget that skipped it would cost that much less")
    write("confirmation_split", {"setup": {"model": "smollm2-135m", "split": "valid", "seed": cfg.seed,
                                           "confirm_prompts": cfg.confirm_prompts,
                                           "confirm_ppl_tokens": cfg.confirm_ppl_tokens,
                                           "bias_inputs": inputs["bias_inputs"],
                                           "perplexity_inputs": inputs["perplexity_inputs"]},
                                 "rows": rows, "mean_bias_share_of_masks": share})


if __name__ == "__main__":
    main()
