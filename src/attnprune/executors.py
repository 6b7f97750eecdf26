"""Where mask evaluations run: in this process (default) or on Ray actors.

An executor takes a list of masks and calls ``on_result(evaluation)`` for each as soon as
it is available; the caller (the run) commits each result to the store right there, so
what finished is never lost. Both executors build their evaluators from one
:class:`EvaluatorSpec`, so a Ray worker measures exactly what the in-process evaluator
measures (the driver checks the workers' setting description against its own).

Ray (``pip install attnprune[ray]``): each worker is an actor that loads the model once
and evaluates chunks of ``mask_batch`` masks. A worker that dies (killed, out of memory,
node lost) is restarted by Ray up to ``max_restarts`` times; its unfinished chunk goes
back to the queue and runs on whichever worker is free next. A chunk is never committed
twice: results reach the store only through the driver.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from attnprune.errors import UserError, missing_package
from attnprune.evaluation import Evaluation, Evaluator
from attnprune.heads import HeadMask

OnResult = Callable[[Evaluation], None]


@dataclass(frozen=True)
class EvaluatorSpec:
    """A recipe for an :class:`Evaluator`: the model to load and the measures' options."""

    model: str
    bias: str = "likelihood"
    bias_options: dict = field(default_factory=dict)
    perplexity_options: dict = field(default_factory=dict)
    split: str = "valid"
    backend_options: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None
    cache_dir: str | None = None

    def build(self, loaded=None) -> Evaluator:
        """The evaluator, on ``loaded`` or on the model this spec names (loaded here)."""
        if loaded is None:
            from attnprune.models import load_model

            loaded = load_model(self.model, device=self.device, dtype=self.dtype, cache_dir=self.cache_dir,
                                device_map=self.device_map)
        return Evaluator(loaded, bias=self.bias, bias_options=self.bias_options,
                         perplexity_options=self.perplexity_options, split=self.split,
                         backend_options=self.backend_options)


class Executor(ABC):
    """Evaluates masks somewhere and reports each result as it arrives."""

    name: str = "executor"

    @abstractmethod
    def evaluate(self, masks: Sequence[HeadMask], on_result: OnResult, with_perplexity: bool = True) -> None:
        """Evaluate every mask once; call ``on_result`` for each (in completion order).

        ``with_perplexity`` False measures the bias only (the perplexity reads NaN).
        """

    def describe(self) -> dict:
        """Where evaluations run (for reports)."""
        return {"executor": self.name}

    def close(self) -> None:
        """Release workers."""


def chunks(masks: Sequence[HeadMask], size: int) -> list[list[HeadMask]]:
    """Consecutive chunks of at most ``size`` masks."""
    size = max(1, size)
    return [list(masks[i:i + size]) for i in range(0, len(masks), size)]


class LocalExecutor(Executor):
    """Evaluates on one in-process evaluator, ``mask_batch`` masks per forward batch."""

    name = "local"

    def __init__(self, evaluator: Evaluator, mask_batch: int = 1):
        self.evaluator, self.mask_batch = evaluator, mask_batch

    def evaluate(self, masks: Sequence[HeadMask], on_result: OnResult, with_perplexity: bool = True) -> None:
        for chunk in chunks(masks, self.mask_batch):
            for ev in self.evaluator.evaluate(chunk, with_perplexity=with_perplexity):
                on_result(ev)


class _Worker:
    """A Ray actor: one loaded model, one evaluator."""

    def __init__(self, spec: EvaluatorSpec, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.evaluator = spec.build()

    def describe(self) -> dict:
        return self.evaluator.describe()

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, pruned: list[list[tuple[int, int]]], with_perplexity: bool = True) -> list[Evaluation]:
        shape = self.evaluator.loaded.layout.shape
        return self.evaluator.evaluate([HeadMask.from_pruned(*shape, p) for p in pruned],
                                       with_perplexity=with_perplexity)


def _ray():
    try:
        import ray
    except ImportError:
        raise missing_package("ray", "--executor ray", "pip install 'attnprune[ray]'") from None
    return ray


class RayExecutor(Executor):
    """Evaluates on ``workers`` Ray actors, each with its own copy of the model."""

    name = "ray"

    def __init__(self, spec: EvaluatorSpec, workers: int = 2, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                 address: str | None = None, mask_batch: int = 1, max_restarts: int = 2,
                 expected: dict | None = None, start_timeout: float = 600):
        if workers < 1:
            raise UserError("--workers must be at least 1.")
        ray = _ray()
        self.spec, self.mask_batch, self.max_restarts = spec, mask_batch, max_restarts
        self.cpus, self.gpus = cpus_per_worker, gpus_per_worker
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
                else:
                    ray.init(num_cpus=max(os.cpu_count() or 1, int(workers * cpus_per_worker + 0.999)),
                             include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            except ConnectionError as exc:
                raise UserError(f"Could not connect to the Ray cluster at {address!r} ({exc}); check --address.") from None
            self._owns_ray = True
        else:
            self._owns_ray = False
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=max_restarts,
                           max_task_retries=0)(_Worker)
        threads = max(1, int(cpus_per_worker))
        self.actors = [actor.remote(spec, threads) for _ in range(workers)]
        try:
            descriptions = ray.get([a.describe.remote() for a in self.actors], timeout=start_timeout)
        except ray.exceptions.RayTaskError as exc:
            self.close()
            raise _cause(exc) from None
        except ray.exceptions.RayActorError as exc:
            self.close()
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise UserError(f"A Ray worker could not start ({first}); check that attnprune and the model load "
                            "on every node (run `attnprune info --model ...` there).") from None
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise UserError(f"The Ray workers did not start within {start_timeout:.0f} s; the cluster may lack the "
                            f"requested {cpus_per_worker:g} CPUs / {gpus_per_worker:g} GPUs per worker: lower "
                            "--worker-cpus/--worker-gpus or --workers.") from None
        if expected is not None and any(d != expected for d in descriptions):
            self.close()
            raise UserError("The Ray workers measure something else than this run (different data or package "
                            "version on the workers); install the same attnprune and data on every node.")
        self.restarts_seen = 0
        self.retried_chunks = 0
        self.last_worker: int | None = None

    def describe(self) -> dict:
        return {"executor": self.name, "workers": len(self.actors), "cpus_per_worker": self.cpus,
                "gpus_per_worker": self.gpus, "mask_batch": self.mask_batch}

    def worker_pids(self, wait_s: float = 300) -> list[int]:
        """Process ids of the workers (for tests and monitoring); waits for restarting workers."""
        ray = _ray()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return ray.get([a.pid.remote() for a in self.actors])
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def evaluate(self, masks: Sequence[HeadMask], on_result: OnResult, with_perplexity: bool = True) -> None:
        ray = _ray()
        pending = deque(chunks(masks, self.mask_batch))
        failures = [0] * len(self.actors)
        idle = deque(range(len(self.actors)))
        inflight: dict = {}
        while pending or inflight:
            while pending and idle:
                w = idle.popleft()
                chunk = pending.popleft()
                ref = self.actors[w].evaluate.remote([[tuple(p) for p in m.pruned] for m in chunk], with_perplexity)
                inflight[ref] = (w, chunk)
            if not inflight:
                raise UserError(f"Every Ray worker died more than {self.max_restarts} times; {len(pending)} chunks "
                                "of masks are left (all finished ones are in the store). Check the workers' memory "
                                "and logs, then rerun: the run continues where it stopped.")
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                w, chunk = inflight.pop(ref)
                try:
                    results = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    # restarting after a death already counted: the chunk waits for a free worker
                    pending.appendleft(chunk)
                    self.retried_chunks += 1
                    time.sleep(0.2)
                    idle.append(w)
                    continue
                except ray.exceptions.RayActorError:
                    # the worker died mid-chunk: the chunk goes back to the queue
                    pending.appendleft(chunk)
                    self.retried_chunks += 1
                    failures[w] += 1
                    if failures[w] <= self.max_restarts:
                        idle.append(w)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    raise _cause(exc) from None
                self.last_worker = w  # whose results on_result is receiving (for monitoring and tests)
                for ev in results:
                    on_result(ev)
                idle.append(w)
        self.restarts_seen = sum(failures)

    def close(self) -> None:
        ray = _ray()
        for a in getattr(self, "actors", []):
            ray.kill(a)
        self.actors = []
        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()


def _cause(exc) -> Exception:
    """The worker's own exception (a UserError stays a UserError) out of a RayTaskError."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


def make_executor(kind: str, spec: EvaluatorSpec, evaluator: Evaluator | None = None, mask_batch: int = 1,
                  workers: int = 2, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                  address: str | None = None) -> Executor:
    """``local`` (on ``evaluator``) or ``ray``."""
    if kind == "local":
        return LocalExecutor(evaluator if evaluator is not None else spec.build(), mask_batch)
    if kind == "ray":
        expected = evaluator.describe() if evaluator is not None else None
        return RayExecutor(spec, workers, cpus_per_worker, gpus_per_worker, address, mask_batch, expected=expected)
    raise UserError(f"Unknown executor '{kind}'; use 'local' or 'ray'.")
