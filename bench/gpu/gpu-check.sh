#!/usr/bin/env bash
# Everything a GPU session needs to verify and measure, in few commands (the device tool
# runs one command per call; keep calls few). Logs go to a folder packed at the end into
# ${OUT:-./gpu-logs}/logs.tgz (with any tuned file beside it); each
# phase has a time cap (seconds, env CAP_<PHASE>) so that one slow phase cannot eat the
# others' output.
#   tests              GPU tests (all of tests/, GPU cases included; pytest-xdist if present)
#   bench              forward table (candidates file) and forward+backward table
#   benchfwd           the forward table alone, with the config the runtime picks
#   benchbwd           the forward+backward table alone
#   layer              the layer and dispatcher tests (fla comparison when fla is carried)
#   overhead           per-call CPU overhead
#   trace              where a forward wavefront step goes (bench/step_trace.py, in-kernel timer)
#   stages             each stage's time alone beside SDPA (bench/stages.py)
#   variants           the forward solve under knob variants, per head dim, side by side
#                      (bench/solve_variants.py; VARIANTS_128, VARIANTS_64 override the lists)
#   varlen             packed variable-length throughput against an equal-length batch
#   tune [MIN]         tune the buckets of $SHAPES (default bench/shapes-h200.yaml; MIN minutes
#                      of search per bucket, default 0.5; the candidates file tried first), merged
#                      into tuned/<gpu>.yaml (copied back)
#   sweep              Optuna (TPE, 3 seeds, cold start) against an exhaustive sweep on two
#                      buckets (bench/sweep-*.yaml); bench/sweep_compare.py ranks its picks in the sweep.
#                      The 48-point grids need a device call of their own: 8 compiles at a time timed
#                      20 to 31 points in 100 s (run 26); the caps default to 240 s per grid, 90 s per seed;
#                      SWEEP=d128 (or d64) runs that bucket's files alone
#   models             with the installed tuned file: dfgen show, dfgen check, the model
#                      tests (torch.compile, CUDA graphs), and `dfgen bench` as the runtime picks
# Several phases may be given: bash bench/gpu-check.sh tests bench overhead
set -uo pipefail
cd "$(dirname "$0")/.."
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
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . \
  > "$out/install.txt" 2>&1 || { cat "$out/install.txt"; exit 1; }
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH DFGEN_TEST_INSTALLED=1
cd "$(mktemp -d /tmp/gpu-work.XXXX)"
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
gpu=$(python3 -c "import torch; from dfgen.select.gpu import gpu_key; print(gpu_key(torch.cuda.get_device_name()))")
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
status=0
capped() { local cap=$1; shift; timeout -k 10 "$cap" "$@"; local rc=$?; [ $rc -eq 124 ] && echo "(stopped at the ${cap} s cap)"; return $rc; }
bench_table() {  # bench_table NAME CAP [dfgen bench args...]: the table, then each row's line
  local name=$1 cap=$2; shift 2
  capped "$cap" python3 -m dfgen bench "$@" > "$out/bench-$name.txt" 2> "$out/bench-$name.err" || status=1
  cat "$out/bench-$name.txt"; grep "dfgen bench:" "$out/bench-$name.err"
}
while [ $# -gt 0 ]; do
  start=$SECONDS; phase=$1
  case "$1" in
    tests)
      capped "${CAP_TESTS:-300}" python3 -m pytest -q -p no:cacheprovider $xdist $SRC/tests > "$out/pytest.txt" 2>&1 || status=1
      grep -E "^(FAILED|ERROR)" "$out/pytest.txt" | head -20; tail -n 2 "$out/pytest.txt";;
    bench)  # forward over the candidates file, then forward+backward as the runtime picks
      bench_table fwd "${CAP_BENCH_FWD:-150}" --configs $SRC/bench/candidates-h200.yaml
      bench_table fwdbwd "${CAP_BENCH_BWD:-150}" --backward;;
    benchfwd) bench_table fwd "${CAP_BENCH_FWD:-150}";;
    benchbwd) bench_table fwdbwd "${CAP_BENCH_BWD:-150}" --backward;;
    bwdrow) bench_table bwdrow "${CAP_BWDROW:-90}" --backward --shapes "${ROW:-1,4096,16,128}";;
    fla)
      capped "${CAP_FLA:-60}" python3 -m pytest -q -s -p no:cacheprovider $SRC/tests/test_layer.py -k fla > "$out/fla.txt" 2>&1 || status=1
      grep -E "^E |passed|failed|relative errors" "$out/fla.txt" | head;;
    layer)
      capped "${CAP_LAYER:-90}" python3 -m pytest -q -p no:cacheprovider $SRC/tests/test_layer.py $SRC/tests/test_dispatch.py > "$out/layer.txt" 2>&1 || status=1
      grep -E "^(FAILED|ERROR)|Error" "$out/layer.txt" | head; tail -n 2 "$out/layer.txt";;
    trace)
      capped "${CAP_TRACE:-90}" python3 $SRC/bench/step_trace.py > "$out/trace.txt" 2>&1 || status=1; tail -n 6 "$out/trace.txt";;
    stages)
      capped "${CAP_STAGES:-90}" python3 $SRC/bench/stages.py > "$out/stages.txt" 2>&1 || status=1; tail -n 8 "$out/stages.txt";;
    variants)
      v128=${VARIANTS_128:-"default: ;fp16: SOLVE_PRECISION=fp16;s3: num_stages=3;L1s3: LOOKAHEAD=1,num_stages=3"}
      v64=${VARIANTS_64:-"default: ;fp16: SOLVE_PRECISION=fp16;L1s4: LOOKAHEAD=1,num_stages=4;n128r168: BLOCK_N=128,num_stages=2,maxnreg=168,SOLVE_PRECISION=fp16"}
      capped "${CAP_VARIANTS:-100}" python3 $SRC/bench/solve_variants.py --shapes "1,4096,16,128;1,8192,16,128;1,16384,8,128" \
        --variants "$v128" > "$out/variants-d128.txt" 2>&1 || status=1; grep "^|" "$out/variants-d128.txt"
      capped "${CAP_VARIANTS:-100}" python3 $SRC/bench/solve_variants.py --shapes "8,1024,32,64;4,2048,16,64;2,8192,16,64" \
        --variants "$v64" > "$out/variants-d64.txt" 2>&1 || status=1; grep "^|" "$out/variants-d64.txt";;
    overhead)
      capped "${CAP_OVERHEAD:-60}" python3 $SRC/bench/overhead.py > "$out/overhead.txt" 2>&1 || status=1; tail -n 8 "$out/overhead.txt";;
    varlen)
      capped "${CAP_VARLEN:-90}" python3 $SRC/bench/varlen.py > "$out/varlen.txt" 2>&1 || status=1; tail -n 6 "$out/varlen.txt";;
    tune)
      minutes=0.5; [ $# -gt 1 ] && [[ "$2" =~ ^[0-9.]+$ ]] && { minutes=$2; shift; }
      capped "${CAP_TUNE:-480}" python3 -m dfgen tune --gpu "$gpu" --shapes "${SHAPES:-bench/shapes-h200.yaml}" \
        --space $SRC/bench/space-h200-bf16.yaml --try $SRC/bench/candidates-h200.yaml --trials 200 --minutes "$minutes" --timeout 240 \
        --storage "$out/tune.journal" --out "$SRC/tuned/$gpu.yaml" > "$out/tune.txt" 2>&1 || status=1
      grep -E "^[a-z+]+/.*: best|^\|" "$out/tune.txt" | tail -n 40
      [ -f "$SRC/tuned/$gpu.yaml" ] && cp "$SRC/tuned/$gpu.yaml" "$out/$gpu.yaml" && echo "merged into $SRC/tuned/$gpu.yaml";;
    sweep)
      # the grid times every point (candidates compile SWEEP_JOBS, default 8, at a time); then TPE with a quarter of
      # the grid's trials, not started from the default, three seeds, one at a time
      for b in $SRC/bench/sweep-${SWEEP:-*}.yaml; do
        name=$(basename "$b" .yaml)
        capped "${CAP_SWEEP:-240}" python3 -m dfgen tune --gpu "$gpu" --shapes "$b" --space "$SRC/bench/$name.space" \
          --sampler grid --trials 1000 --jobs "${SWEEP_JOBS:-8}" --storage "$out/sweep-grid.journal" --out "$out/sweep.yaml" > "$out/$name-grid.txt" 2>&1 || status=1
        n=$(python3 -c "from dfgen.tools.tuning.tuner import load_buckets, load_space; from dfgen.tools.tuning.space import bucket_limits, grid, grid_size
b = load_buckets('$b')[0]; limits = bucket_limits(b['dtype'], load_space('$SRC/bench/$name.space'))
print(max(1, grid_size(grid(b['pass_'], b['head_dim'], b['variant'], limits)) // 4))")
        for seed in 0 1 2; do
          capped "${CAP_SWEEP_TPE:-90}" python3 -m dfgen tune --gpu "$gpu" --shapes "$b" --space "$SRC/bench/$name.space" \
            --trials "$n" --jobs 1 --seed $seed --cold-start --storage "$out/sweep-tpe-seed$seed.journal" \
            --out "$out/optuna.yaml" > "$out/$name-tpe-seed$seed.txt" 2>&1 || status=1
        done
        grep -h -E ": best" "$out/$name-grid.txt" "$out/$name"-tpe-*.txt
      done
      python3 $SRC/bench/sweep_compare.py "$out/sweep-grid.journal" "$out"/sweep-tpe-seed*.journal | tee "$out/sweep-compare.txt";;
    models)
      python3 -m dfgen show 2>&1 | tee "$out/show.txt" | tail -n 4
      capped "${CAP_CHECK:-120}" python3 -m dfgen check > "$out/check.txt" 2>&1 || status=1; tail -n 4 "$out/check.txt"
      capped "${CAP_MODELS:-120}" python3 -m pytest -q -p no:cacheprovider $SRC/tests/test_models_gpu.py > "$out/models.txt" 2>&1 || status=1; tail -n 2 "$out/models.txt"
      capped "${CAP_BENCH_TUNED:-200}" python3 -m dfgen bench > "$out/bench-fwd-tuned.txt" 2>&1 || status=1; grep -v "^dfgen bench:" "$out/bench-fwd-tuned.txt";;
    *) echo "unknown phase $1"; status=2;;
  esac
  echo "[$phase: $((SECONDS - start)) s]"
  shift
done
exit $status
