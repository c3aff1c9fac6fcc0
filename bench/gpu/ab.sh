#!/usr/bin/env bash
# A/B on the GPU in one device call: the working tree ("new") and other trees (.dev/<name>,
# e.g. `mkdir .dev/old && git archive HEAD | tar x -C .dev/old`, carried with the call) benched
# one after another, each beside its own SDPA column. Unlike gpu-check.sh, each tree runs from
# its own source (PYTHONPATH=<tree>:/tmp/site), not installed: that is the comparison.
# Logs: $OUT/logs.tgz.
# usage: FWD="new old" FWDC=new BWD="new old" STAGES="new" bash bench/gpu/ab.sh [pytest args...]
#   FWD/BWD: trees whose forward / forward+backward table to take (default configs);
#   FWDC: a tree to bench with the candidates suite $CANDIDATES of bench/suites.yaml (default h200);
#   STAGES: trees whose per-stage times (bench/run.py stages) to take; then pytest on the working tree.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
OUT=${OUT:-$PWD/gpu-logs}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
root=$PWD
run() {  # run fwd|bwd TREE [TAG]
  local extra=""; [ $1 = bwd ] && extra="--backward"
  local d=$root; [ $2 != new ] && d=$root/.dev/$2
  local tag=${3:-$2}
  (cd $d && PYTHONPATH=$d:/tmp/site timeout ${CAP:-110} python3 -m dfgen bench --no-fla $extra ${BENCH_ARGS:-} > $OUT/$1-$tag.txt 2> $OUT/$1-$tag.err; echo "[$1 $tag rc=$? $SECONDS s]")
  grep -E "^\| [0-9]" $OUT/$1-$tag.txt | cut -c1-100
}
for t in ${FWD:-}; do run fwd $t; done
if [ -n "${FWDC:-}" ]; then  # the working tree's runner writes the suite as `dfgen bench --configs` reads it
  cand=$(mktemp --suffix=.yaml /tmp/candidates.XXXX)
  PYTHONPATH=$root:/tmp/site python3 bench/run.py --write candidates "${CANDIDATES:-h200}" "$cand" \
    && BENCH_ARGS="--verbose --configs $cand" run fwd ${FWDC} cand
fi
for t in ${STAGES:-}; do
  d=$root; [ $t != new ] && d=$root/.dev/$t
  stages="bench/run.py stages"; [ -f $d/bench/run.py ] || stages=bench/stages.py  # trees from before the runner
  (cd $d && PYTHONPATH=$d:/tmp/site timeout ${CAP:-110} python3 $stages ${STAGE_ARGS:-} > $OUT/stages-$t.txt 2>&1; echo "[stages $t rc=$? $SECONDS s]"); grep "^|" $OUT/stages-$t.txt
done
for t in ${BWD:-}; do run bwd $t; done
if [ $# -gt 0 ]; then
  PYTHONPATH=$root:/tmp/site timeout ${CAP_TESTS:-200} python3 -m pytest -q -x -p no:cacheprovider "$@" > $OUT/pytest.txt 2>&1
  echo "[tests rc=$? $SECONDS s]"; grep -E "^(FAILED|ERROR)" $OUT/pytest.txt | head; tail -n 2 $OUT/pytest.txt
fi
(cd $OUT && tar czf logs.tgz *.txt *.err 2>/dev/null; rm -f *.txt *.err)
