"""Helpers shared by the benchmark scripts: timing and writing results."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from attnprune.machine import describe_machine

RESULTS = Path(__file__).parent / "results"

# seeds whose data development may read (test splits included); every other seed is kept for evaluation
DEVELOPMENT_SEEDS = (0, 1, 2)


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
