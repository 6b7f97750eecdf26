#!/usr/bin/env bash
# One evaluation seed of the fair benchmark (issue 21), run the way the README's "At a glance" table was made:
# all four methods in one `attnprune compare`, from a frozen git worktree, into a store outside the repository.
#
#   bash benchmarks/eval_seed.sh SEED [COMMIT] [ROOT]
#
# COMMIT defaults to HEAD; ROOT (default /work/evalruns) receives
#   tree-SEED/      the frozen worktree the code is imported from (kept for benchmarks/eval_guard_arm.sh;
#                   remove it with `git worktree remove --force ROOT/tree-SEED` when done),
#   seed-SEED/      the comparison (comparison.json/.md/.png) and its store seed-SEED/seed-SEED/,
#   seed-SEED.log   the run's log, opened by a line with the start, commit and machine and closed by "rc N" and the end.
# Re-running the same command after an interruption reads the stored evaluations back.
#
# A seed is run only once it is pre-registered: a line naming "seed SEED" in benchmarks/results/compare/PLAN.md,
# committed before the run. Nothing else should run on the machine meanwhile (the seconds are compared).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
seed=${1:?usage: bash benchmarks/eval_seed.sh SEED [COMMIT] [ROOT]}
commit=${2:-HEAD}
root=${3:-/work/evalruns}
plan=$here/benchmarks/results/compare/PLAN.md
if ! git -C "$here" show "HEAD:benchmarks/results/compare/PLAN.md" 2>/dev/null | grep -Eq "seed $seed([^0-9]|$)"; then
  echo "seed $seed is not pre-registered: name it in $plan and commit that before running it." >&2
  exit 2
fi
mkdir -p "$root"
tree=$root/tree-$seed
[ -d "$tree" ] || git -C "$here" worktree add --detach "$tree" "$commit" >/dev/null
log=$root/seed-$seed.log
cd "$tree"
{
  echo "start $(date -u +%FT%TZ) commit $(git rev-parse --short=7 HEAD) cpu '$(lscpu | sed -n 's/^Model name: *//p')' cores $(nproc)"
  set +e
  # PYTHONPATH: the frozen worktree's code, ahead of the editable install's
  PYTHONPATH="$tree/src" "$here/.venv/bin/attnprune" compare --methods ap,fasp,random_search,ap_paper \
    --test-prompts 10000 --seeds "$seed" --transfer-axes "" --checks none --out "$root/seed-$seed"
  echo "rc $?"
  echo "end $(date -u +%FT%TZ)"
} >> "$log" 2>&1
