#!/usr/bin/env bash
# Set up .venv (first time only) and run the main job: repair the default packaged model
# (SmolLM2-135M) offline on the CPU. Extra arguments go to `attnprune repair`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/attnprune repair "$@"
