#!/usr/bin/env bash
# Everything a GPU session needs to verify and measure, in one device call (the device tool
# runs one command per call; keep calls few): bash bench/gpu/gpu-check.sh PHASE [PHASE ...].
# The checkout is installed (non-editable) into /tmp/site and every phase runs from a scratch
# folder against that copy; the benchmarks run through bench/run.py over the suites of
# bench/suites.yaml. Logs go to a folder packed at the end into ${OUT:-./gpu-logs}/logs.tgz
# (with any tuned file beside it); each phase has a time cap (seconds, env CAP_<PHASE>) so
# that one slow phase cannot eat the others' output.
#   tests              GPU tests (all of tests/, GPU cases included; pytest-xdist if present, TEST_WORKERS
#                      processes, default 14;
#                      TESTS="tests/test_backward.py ...": those files only)
#   bench              run.py fwd --candidates h200, then run.py fwdbwd (as the runtime picks)
#   benchfwd           the forward table alone, with the config the runtime picks
#   benchbwd           the forward+backward table alone (BENCH_ARGS: more options, e.g. --no-fla)
#   bwdrow             one forward+backward row (ROW: a shape suite or B,T,H,D; default row)
#   fla                the layer test against fla (when fla is carried)
#   layer              the layer and dispatcher tests (fla comparison when fla is carried)
#   overhead           per-call CPU overhead (run.py overhead)
#   trace              where a forward wavefront step goes (run.py step-trace, in-kernel timer)
#   stages             each stage's time alone beside SDPA (run.py stages)
#   variants           the forward solve under knob variants, per head dim, side by side
#                      (run.py variants d128 / d64; VARIANTS_128, VARIANTS_64 override the lists)
#   varlen             packed variable-length throughput against an equal-length batch
#   decode             a decode step against SDPA's one-query attention, prefill with return_cache
#   decodesweep        each decode row's kernels under a grid of decode knobs (the five fastest)
#   tune [MIN]         tune the bucket suite $SHAPES (default h200; MIN minutes of search per
#                      bucket, default 0.5; space h200-bf16, candidates h200 tried first), merged
#                      into tuned/<gpu>.yaml (copied back)
#   tuneset [TOTAL]    a user's tune: `dfgen tune --total-minutes TOTAL` (default 20) over the shipped
#                      bucket set (HEAD_DIMS=128 or 64: that half; COLD=1: --cold-start), with a
#                      fresh journal and tuned file (copied back as <gpu>.yaml)
#   workers [MIN]      trials per minute on one GPU, then `--workers 2` on two (SHAPES_WORKERS, default
#                      d128-t4096; MIN minutes per bucket, default 2), each from an empty Triton cache
#                      (WARM=1: both from one cache that a throwaway run filled first, so that
#                      compiling from cold, 20 to 30 s of a short bucket on the H200, is not measured)
#   cold [MIN]         a cold-start tune (`dfgen tune --cold-start`, MIN minutes per bucket, default 5)
#                      of the bucket suite $SHAPES_COLD (default h200-core; HEAD_DIMS=128 or 64: those
#                      buckets), its tuned file copied back
#                      as cold.yaml (then: COMPARE_FILES="cold=DIR/cold.yaml" ... compare)
#   compare            compare-configs on the core buckets (COMPARE_SHAPES: another bucket suite): the
#                      default, the packaged tuned file, a cold phase's cold.yaml of this run, and
#                      COMPARE_FILES (NAME=FILE ...: tuned files or journals, paths relative to the
#                      checkout) end to end side by side
#   sweep              Optuna (TPE, 3 seeds, cold start) against an exhaustive sweep on the buckets
#                      of the sweeps suites (run.py sweep: ranks of TPE's picks in the sweep, and
#                      the picks end to end). Caps: CAP_SWEEP per grid (default 360 s), CAP_SWEEP_TPE
#                      per seed (60 s); SWEEP=d128 (or d64) runs one; SWEEP_GRID_FROM=DIR (in the
#                      checkout, e.g. .dev/grids) reuses the grid journals found there
#   models             with the installed tuned file: dfgen show, dfgen check, the model
#                      tests (torch.compile, CUDA graphs), and run.py fwd as the runtime picks
# Several phases may be given: bash bench/gpu/gpu-check.sh tests bench overhead
set -uo pipefail
cd "$(dirname "$0")/../.."
dest=${OUT:-gpu-logs}
out=$(mktemp -d /tmp/gpu-logs.XXXX)
mkdir -p "$dest" && dest=$(cd "$dest" && pwd)
pack() { cp "$out"/*.yaml "$dest"/ 2>/dev/null; tar czf "$dest/logs.tgz" -C "$out" .; }
trap pack EXIT
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# dfgen as a user has it: installed (non-editable) from this checkout, with the carried wheels
# (optuna and its needs); every phase runs from a scratch folder, so nothing imports the
# checkout's dfgen/
SRC=$PWD
[ -n "${INSTALLED:-}" ] || bash bench/gpu/install.sh "$out/install.txt" || exit 1  # two-gpus.sh: done once
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH DFGEN_TEST_INSTALLED=1
cd "$(mktemp -d /tmp/gpu-work.XXXX)"
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
gpu=$(python3 -c "import torch; from dfgen.select.gpu import gpu_key; print(gpu_key(torch.cuda.get_device_name()))")
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-14}" || echo "")  # 16 cores: the compiles are the tests' bottleneck
status=0
run="python3 $SRC/bench/run.py"  # the benchmark runner, against /tmp/site
capped() { local cap=$1; shift; timeout -k 10 "$cap" "$@"; local rc=$?; [ $rc -eq 124 ] && echo "(stopped at the ${cap} s cap)"; return $rc; }
bench_table() {  # bench_table NAME CAP fwd|fwdbwd [options]: the table, then each row's line
  local name=$1 cap=$2; shift 2
  capped "$cap" $run "$@" > "$out/bench-$name.txt" 2> "$out/bench-$name.err" || status=1
  cat "$out/bench-$name.txt"; grep "dfgen bench:" "$out/bench-$name.err"
}
while [ $# -gt 0 ]; do
  start=$SECONDS; phase=$1
  case "$1" in
    tests)
      # -v: each test's line, so that a run stopped at its cap still says which tests ran; -rs: why each skip
      capped "${CAP_TESTS:-300}" python3 -m pytest -v -rfEs -p no:cacheprovider $xdist \
        $(for t in ${TESTS:-tests}; do echo "$SRC/$t"; done) > "$out/pytest.txt" 2>&1 || status=1
      grep -E "^(FAILED|ERROR)" "$out/pytest.txt" | head -20
      echo "$(grep -c " PASSED " "$out/pytest.txt") passed, $(grep -c " SKIPPED " "$out/pytest.txt") skipped, $(grep -cE " (FAILED|ERROR) " "$out/pytest.txt") failed or errors (lines)"
      tail -n 1 "$out/pytest.txt";;
    bench)  # forward over the h200 candidates, then forward+backward as the runtime picks
      bench_table fwd "${CAP_BENCH_FWD:-150}" fwd --candidates h200
      bench_table fwdbwd "${CAP_BENCH_BWD:-150}" fwdbwd;;
    benchfwd) bench_table fwd "${CAP_BENCH_FWD:-150}" fwd ${BENCH_ARGS:-};;
    benchbwd) bench_table fwdbwd "${CAP_BENCH_BWD:-150}" fwdbwd ${BENCH_ARGS:-};;
    bwdrow) bench_table bwdrow "${CAP_BWDROW:-90}" fwdbwd --shapes "${ROW:-row}";;
    fla)
      capped "${CAP_FLA:-60}" python3 -m pytest -q -s -p no:cacheprovider $SRC/tests/test_layer.py -k fla > "$out/fla.txt" 2>&1 || status=1
      grep -E "^E |passed|failed|relative errors" "$out/fla.txt" | head;;
    layer)
      capped "${CAP_LAYER:-90}" python3 -m pytest -q -p no:cacheprovider $SRC/tests/test_layer.py $SRC/tests/test_dispatch.py > "$out/layer.txt" 2>&1 || status=1
      grep -E "^(FAILED|ERROR)|Error" "$out/layer.txt" | head; tail -n 2 "$out/layer.txt";;
    trace)
      capped "${CAP_TRACE:-90}" $run step-trace > "$out/trace.txt" 2>&1 || status=1; tail -n 6 "$out/trace.txt";;
    stages)
      capped "${CAP_STAGES:-90}" $run stages > "$out/stages.txt" 2>&1 || status=1; tail -n 8 "$out/stages.txt";;
    variants)
      capped "${CAP_VARIANTS:-100}" $run variants d128 ${VARIANTS_128:+--variants "$VARIANTS_128"} \
        > "$out/variants-d128.txt" 2>&1 || status=1; grep "^|" "$out/variants-d128.txt"
      capped "${CAP_VARIANTS:-100}" $run variants d64 ${VARIANTS_64:+--variants "$VARIANTS_64"} \
        > "$out/variants-d64.txt" 2>&1 || status=1; grep "^|" "$out/variants-d64.txt";;
    overhead)
      capped "${CAP_OVERHEAD:-60}" $run overhead > "$out/overhead.txt" 2>&1 || status=1; tail -n 8 "$out/overhead.txt";;
    varlen)
      capped "${CAP_VARLEN:-90}" $run varlen > "$out/varlen.txt" 2>&1 || status=1; tail -n 6 "$out/varlen.txt";;
    decode)
      capped "${CAP_DECODE:-120}" $run decode > "$out/decode.txt" 2>&1 || status=1; cat "$out/decode.txt";;
    decodesweep)
      capped "${CAP_DECODESWEEP:-240}" $run decode --sweep > "$out/decodesweep.txt" 2>&1 || status=1
      cat "$out/decodesweep.txt";;
    tune)
      minutes=0.5; [ $# -gt 1 ] && [[ "$2" =~ ^[0-9.]+$ ]] && { minutes=$2; shift; }
      capped "${CAP_TUNE:-480}" $run tune --buckets "${SHAPES:-h200}" --space h200-bf16 --candidates h200 \
        --gpu "$gpu" --trials 200 --minutes "$minutes" --timeout 240 \
        --storage "$out/tune.journal" --out "$SRC/tuned/$gpu.yaml" > "$out/tune.txt" 2>&1 || status=1
      grep -E "^[a-z+]+/.*: best|^\|" "$out/tune.txt" | tail -n 40
      [ -f "$SRC/tuned/$gpu.yaml" ] && cp "$SRC/tuned/$gpu.yaml" "$out/$gpu.yaml" && echo "merged into $SRC/tuned/$gpu.yaml";;
    sweep)
      # per sweeps suite: the grid times every point (SWEEP_JOBS, default 8, compiles at a time);
      # then TPE with at most a quarter of each stage's points, not started from the default, three
      # seeds, one at a time; then where TPE's picks rank in the grid, and the picks end to end
      # (logs and journals in the log folder)
      [ -n "${SWEEP_GRID_FROM:-}" ] && cp "$SRC/$SWEEP_GRID_FROM"/sweep-*-grid.journal "$out"/  # grids kept
      $run sweep ${SWEEP:-} ${SWEEP_GRID_FROM:+--skip-grid} --gpu "$gpu" --logs "$out" --grid-cap "${CAP_SWEEP:-360}" \
        --tpe-cap "${CAP_SWEEP_TPE:-60}" --jobs "${SWEEP_JOBS:-8}" > "$out/sweep.txt" 2>&1 || status=1
      grep -v "^bench/run.py" "$out/sweep.txt";;
    tuneset)
      total=20; [ $# -gt 1 ] && [[ "$2" =~ ^[0-9.]+$ ]] && { total=$2; shift; }
      rm -f "$out/$gpu.yaml"
      capped "$(python3 -c "print(int($total * 60 + 120))")" python3 -m dfgen tune --gpu "$gpu" \
        ${COLD:+--cold-start} --total-minutes "$total" ${HEAD_DIMS:+--head-dims "$HEAD_DIMS"} \
        --storage "$out/tuneset.journal" --out "$out/$gpu.yaml" > "$out/tuneset.txt" 2>&1 || status=1
      grep -E "^[a-z+]+/.*: (best|the defaults)|^\||^dfgen tune: [0-9]+ bucket|budget ran out|no config" \
        "$out/tuneset.txt" | tail -n 80;;
    workers)
      minutes=2; [ $# -gt 1 ] && [[ "$2" =~ ^[0-9.]+$ ]] && { minutes=$2; shift; }
      $run --write buckets "${SHAPES_WORKERS:-d128-t4096}" "$out/workers-buckets.yaml" > /dev/null
      warm_cache=$(mktemp -d /tmp/triton-warm.XXXX)
      for n in ${WARM:+0} 1 2; do  # each with a fresh journal (run 0: the throwaway warm-up, on both GPUs)
        cache=$(mktemp -d /tmp/triton-w$n.XXXX); [ -n "${WARM:-}" ] && cache=$warm_cache
        TRITON_CACHE_DIR=$cache capped "$(python3 -c "print(int($minutes * 60 + 120))")" \
          python3 -m dfgen tune --gpu "$gpu" --workers $((n > 0 ? n : 2)) --shapes "$out/workers-buckets.yaml" \
          --minutes "$minutes" --total-minutes 0 --storage "$out/workers-$n.journal" \
          --out "$out/workers-$n.yaml" > "$out/workers-$n.txt" 2>&1 || status=1
        echo "--workers $n:"; grep -E "^\||: best|workers finished" "$out/workers-$n.txt"
      done
      $run trial-rate "$out/workers-1.journal" "$out/workers-2.journal" | tee "$out/workers-rate.txt";;
    cold)
      minutes=5; [ $# -gt 1 ] && [[ "$2" =~ ^[0-9.]+$ ]] && { minutes=$2; shift; }
      $run --write buckets "${SHAPES_COLD:-h200-core}" "$out/cold-buckets.yaml" > /dev/null
      capped "${CAP_COLD:-540}" python3 -m dfgen tune --gpu "$gpu" --cold-start --shapes "$out/cold-buckets.yaml" \
        --minutes "$minutes" --total-minutes 0 ${HEAD_DIMS:+--head-dims "$HEAD_DIMS"} \
        --storage "$out/cold.journal" --out "$out/cold.yaml" \
        > "$out/cold.txt" 2>&1 || status=1
      grep -E "^[a-z+]+/.*: (best|the defaults)|^\||^dfgen tune: [0-9]+ bucket|no config" "$out/cold.txt";;
    compare)
      $run --write buckets "${COMPARE_SHAPES:-h200-core}" "$out/core.yaml" > /dev/null
      files=(); [ -f "$out/cold.yaml" ] && files+=("cold=$out/cold.yaml")  # this run's cold phase
      for f in ${COMPARE_FILES:-}; do  # NAME=FILE, FILE relative to the checkout
        name=${f%%=*}; file=${f#*=}; [[ "$file" == /* ]] || file="$SRC/$file"; files+=("$name=$file"); done
      capped "${CAP_COMPARE:-240}" $run compare-configs --buckets "$out/core.yaml" \
        packaged="$(python3 -c "from dfgen.settings import packaged_dir; print(packaged_dir('tuned'))")/$gpu.yaml" \
        "${files[@]}" > "$out/compare.txt" 2>&1 || status=1
      grep -E "^\|" "$out/compare.txt";;
    models)
      python3 -m dfgen show 2>&1 | tee "$out/show.txt" | tail -n 4
      capped "${CAP_CHECK:-120}" python3 -m dfgen check > "$out/check.txt" 2>&1 || status=1; tail -n 4 "$out/check.txt"
      capped "${CAP_MODELS:-120}" python3 -m pytest -q -p no:cacheprovider $SRC/tests/test_models_gpu.py > "$out/models.txt" 2>&1 || status=1; tail -n 2 "$out/models.txt"
      capped "${CAP_BENCH_TUNED:-200}" $run fwd > "$out/bench-fwd-tuned.txt" 2>&1 || status=1
      grep -v -E "^(dfgen bench:|bench/run.py)" "$out/bench-fwd-tuned.txt";;
    *) echo "unknown phase $1"; status=2;;
  esac
  echo "[$phase: $((SECONDS - start)) s]"
  shift
done
exit $status
