"""Helpers shared by the benchmark scripts: timing and writing results."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

from attnprune.config import CompareConfig
from attnprune.machine import describe_machine

RESULTS = Path(__file__).parent / "results"

# seeds whose data development may read (test splits included); every other seed is kept for evaluation
DEVELOPMENT_SEEDS = (0, 1, 2)


def development_seeds(text: str) -> list[int]:
    """A ``--seeds`` value (comma-separated), refused unless every seed is a development seed."""
    seeds = [int(s) for s in text.split(",")]
    if any(s not in DEVELOPMENT_SEEDS for s in seeds):
        raise SystemExit(f"only development seeds {DEVELOPMENT_SEEDS} may be read here")
    return seeds


def seconds_of(fn) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn, repeats: int = 3) -> float:
    """Best wall-clock seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    return min(seconds_of(fn) for _ in range(repeats))


def machine() -> dict:
    """What the numbers were measured on (the same description a repair's report records)."""
    return {**describe_machine(), "platform": platform.platform()}


def write(name: str, data: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def seed_config(comparison, seed: int, seed_dir: Path) -> CompareConfig:
    """The configuration ``comparison`` ran ``seed`` with, pointed at that seed's run directory ``seed_dir``."""
    known = {f.name for f in dataclasses.fields(CompareConfig)}
    cfg = CompareConfig(**{k: v for k, v in comparison.config.items() if k in known})
    return dataclasses.replace(cfg, seed=seed, out=str(seed_dir))
