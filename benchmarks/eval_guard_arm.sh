#!/usr/bin/env bash
# Issue 20's arm beside an evaluation seed: AP re-run with a no-harm guard on a copy of the seed's finished store
# (its stored evaluations are read back, so only the guard's evaluations and the test of a changed choice are new),
# then benchmarks/guard_effect.py on both choices (TEST numbers, reported, never pooled, never used to choose).
#
#   bash benchmarks/eval_guard_arm.sh SEED NAME GUARD_FLAGS...      (after benchmarks/eval_seed.sh SEED [.. ROOT])
#   e.g. bash benchmarks/eval_guard_arm.sh 41 religion0 --guard religion --guard-margin 0 --guard-test harm --guard-prompts 10000
#
# Uses ROOT=${ROOT:-/work/evalruns}: the frozen worktree ROOT/tree-SEED and the comparison ROOT/seed-SEED; writes
# ROOT/guard-NAME-SEED/ (comparison and store), ROOT/guard-NAME-SEED.log, and guard_effect's tables under the
# worktree's benchmarks/results/. Like the seed, an arm is pre-registered in benchmarks/results/compare/PLAN.md.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
seed=${1:?usage: bash benchmarks/eval_guard_arm.sh SEED NAME GUARD_FLAGS...}
name=${2:?usage: bash benchmarks/eval_guard_arm.sh SEED NAME GUARD_FLAGS...}
shift 2
root=${ROOT:-/work/evalruns}
tree=$root/tree-$seed
out=$root/guard-$name-$seed
[ -d "$tree" ] && [ -f "$root/seed-$seed/comparison.json" ] || {
  echo "no finished seed $seed under $root: run benchmarks/eval_seed.sh $seed first." >&2; exit 2; }
[ -d "$out" ] || cp -a "$root/seed-$seed" "$out"
cd "$tree"
export PYTHONPATH="$tree/src"  # the frozen worktree's code, ahead of the editable install's
{
  echo "start $(date -u +%FT%TZ) commit $(git rev-parse --short=7 HEAD) flags $*"
  set +e
  "$here/.venv/bin/attnprune" compare --methods ap --test-prompts 10000 --seeds "$seed" --transfer-axes "" --checks none --out "$out" "$@"
  echo "rc compare $?"
  "$here/.venv/bin/python" benchmarks/guard_effect.py --guarded "$out" --unguarded "$root/seed-$seed" --seed "$seed"
  echo "rc guard_effect $?"
  echo "end $(date -u +%FT%TZ)"
} >> "$out.log" 2>&1
