#!/usr/bin/env bash
# The prepared GPU run (device tool; one H100 or H200, nothing downloadable there).  Builds
# diffcam with the CUDA kernels into /tmp/dc (the image has torch, scikit-build-core, pybind11,
# numba, pytest-benchmark...), then, stage by stage, writes its logs under $OUT:
#   kernels : tests/refine/test_cuda.py -m cuda (the gpu half), compute-sanitizer memcheck /
#             racecheck / synccheck over bench/gpu_sanitize.py, bench/bench_cuda.py (issue 2's
#             GPU targets: 100,000 27x27 maps <= 5 ms, 1024x1024 k=7 <= 80 us)
#   llada   : bench/gpu_llada_v.py (issue 3's GPU targets)
# Usage, from the repository root:  bash bench/gpu_check.sh [kernels|llada|all]  (default all;
# about 4 + 4 minutes, so `all` fits one call with timeout_s=600 only on a warm build cache).
# summary.txt collects one line per step with its exit status.
set -uo pipefail
stage=${1:-all}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDAARCHS=${CUDAARCHS:-90} DIFFCAM_CUDA=on
PY=${PYTHON:-python3}
sum="$OUT/summary.txt"
note() { echo "== $(date -u +%T) $*" | tee -a "$sum"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$sum"
note "build (CUDAARCHS=$CUDAARCHS)"
if ! ls /tmp/dc/diffcam/_cuda*.so >/dev/null 2>&1; then
  $PY -m pip install -q --no-build-isolation --no-deps --target /tmp/dc . >"$OUT/build.txt" 2>&1
  rc=$?
  note "build rc=$rc"
  if [ $rc -ne 0 ]; then tail -40 "$OUT/build.txt"; exit 1; fi
fi
export PYTHONPATH=/tmp/dc
$PY -P -c "from diffcam.refine import _cuda; print('cuda backend:', _cuda.__file__, _cuda.available())" 2>&1 | tee -a "$sum"

if [ "$stage" = kernels ] || [ "$stage" = all ]; then
  note "CUDA tests"
  timeout 240 $PY -P -m pytest -q -p no:cacheprovider -m cuda -ra tests/refine/test_cuda.py \
    >"$OUT/tests.txt" 2>&1
  note "CUDA tests rc=$? : $(tail -1 "$OUT/tests.txt")"
  for tool in memcheck racecheck synccheck; do
    timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -P bench/gpu_sanitize.py \
      >"$OUT/sanitizer-$tool.txt" 2>&1
    note "compute-sanitizer $tool rc=$? : $(grep -E 'ERROR SUMMARY|mismatches' "$OUT/sanitizer-$tool.txt" | tr '\n' ' ')"
  done
  note "CUDA benchmarks"
  timeout 240 $PY -P -m pytest -q -p no:cacheprovider bench/bench_cuda.py --benchmark-only \
    --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/bench_cuda.json" \
    >"$OUT/bench_cuda.txt" 2>&1
  note "CUDA benchmarks rc=$?"
  grep -E "^test_|Name|median" "$OUT/bench_cuda.txt" | head -40 | tee -a "$sum"
fi

if [ "$stage" = llada ] || [ "$stage" = all ]; then
  note "LLaDA-V attribution"
  timeout 420 $PY -P bench/gpu_llada_v.py --json "$OUT/llada_v.json" >"$OUT/llada_v.txt" 2>&1
  note "LLaDA-V rc=$?"
  tail -30 "$OUT/llada_v.txt" | tee -a "$sum"
fi
