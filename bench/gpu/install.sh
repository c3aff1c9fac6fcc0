#!/usr/bin/env bash
# dfgen as a user has it, for the GPU scripts: the carried wheels (.whl: optuna and its
# needs) and this checkout installed (non-editable) into /tmp/site. Run from the checkout's
# root; the pip log goes to $1 (default: stderr). gpu-check.sh runs it before its phases,
# two-gpus.sh once for both of its runs (two pip builds in one tree collide on build/).
log=${1:-/dev/stderr}
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . \
  > "$log" 2>&1 || { [ "$log" != /dev/stderr ] && cat "$log"; exit 1; }
