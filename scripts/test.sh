#!/usr/bin/env bash
# Set up .venv (first time only) and run the whole test suite, real-model tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast part.
# Tests run in one pytest-xdist worker per core (ATTNPRUNE_TEST_WORKERS=0 runs them in this
# process); each worker gets its share of the cores (tests/conftest.py), and BLAS one
# thread, so that workers do not fight over the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
workers=${ATTNPRUNE_TEST_WORKERS:-auto}
if [ "$workers" != 0 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}; fi
exec .venv/bin/python -m pytest -q -n "$workers" "$@"
