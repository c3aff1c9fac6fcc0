#!/usr/bin/env bash
# Everything a GPU session needs to verify and measure, in one command (the device tool
# runs one command per call; keep calls few). Writes logs under ${OUT:-./gpu-logs}.
#   bash bench/gpu-check.sh tests            GPU tests (all of tests/, GPU cases included)
#   bash bench/gpu-check.sh bench            forward table (candidates file) and fwd+bwd table
#   bash bench/gpu-check.sh overhead         per-call CPU overhead
#   bash bench/gpu-check.sh tune [TRIALS]    a tune of the default buckets into tuned/<gpu>.yaml
# Several phases may be given: bash bench/gpu-check.sh tests bench overhead
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
status=0
while [ $# -gt 0 ]; do
  case "$1" in
    tests)
      python3 -m pytest -q tests -x > "$out/pytest.txt" 2>&1 || status=1
      tail -n 3 "$out/pytest.txt";;
    bench)
      python3 -m dfgen.cli bench --configs bench/candidates-h200.yaml > "$out/bench-fwd.txt" 2> "$out/bench-fwd.err" || status=1
      cat "$out/bench-fwd.txt"
      python3 -m dfgen.cli bench --backward > "$out/bench-fwdbwd.txt" 2> "$out/bench-fwdbwd.err" || status=1
      cat "$out/bench-fwdbwd.txt";;
    overhead)
      python3 bench/overhead.py | tee "$out/overhead.txt" || status=1;;
    tune)
      trials=${2:-20}; [ $# -gt 1 ] && [[ "$2" =~ ^[0-9]+$ ]] && shift
      gpu=$(python3 -c "import torch; from dfgen.dispatch import gpu_key; print(gpu_key(torch.cuda.get_device_name()))")
      python3 -m dfgen.cli tune --gpu "$gpu" --trials "$trials" --timeout 300 \
        --storage "$out/tune.journal" --out "$out/$gpu.yaml" > "$out/tune.txt" 2>&1 || status=1
      tail -n 30 "$out/tune.txt";;
    *) echo "unknown phase $1"; status=2;;
  esac
  shift
done
exit $status
