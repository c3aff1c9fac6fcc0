#!/usr/bin/env bash
# One device call on a two-GPU machine, two gpu-check.sh runs at once, one per GPU, over
# one install (/tmp/site), each with its own log folder ($OUT/gpu0, $OUT/gpu1):
#   bash bench/gpu/two-gpus.sh "PHASES FOR GPU 0" "PHASES FOR GPU 1" [ENV=VALUE ...]
# e.g. "HEAD_DIMS=64 tuneset 7.5" "HEAD_DIMS=128 tuneset 7.5": leading NAME=VALUE words of
# a phase list are set in that run's environment only.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${OUT:-gpu-logs}
cd "$here/../.." && bash bench/gpu/install.sh || exit 1  # one install for both runs
pids=()
for gpu in 0 1; do
  phases=${1:-}; shift || true
  [ -z "$phases" ] && continue
  read -r -a words <<< "$phases"
  envs=(); while [ ${#words[@]} -gt 0 ] && [[ "${words[0]}" == *=* ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  mkdir -p "$dest/gpu$gpu"
  env "${envs[@]}" CUDA_VISIBLE_DEVICES=$gpu INSTALLED=1 OUT="$dest/gpu$gpu" \
    bash "$here/gpu-check.sh" "${words[@]}" > "$dest/gpu$gpu/console.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for gpu in 0 1; do [ -f "$dest/gpu$gpu/console.txt" ] && { echo "== GPU $gpu"; cat "$dest/gpu$gpu/console.txt"; }; done
exit $status
