#!/usr/bin/env bash
# gpu_check.sh — everything a GPU machine should run, in stages that each leave their results behind, within one
# time budget (default 360 s, so a failed stage can be fixed and the check rerun).
#
#   make cuda && make gpu-check                      # the CUDA library, then this script (= bash scripts/gpu_check.sh)
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh        # the same script on the CPU, small shapes (CI runs this)
#
# Stages, in order (each under its own `timeout`; a failed stage does not stop the next; after every stage the
# summary and the results so far are copied to $OUT where it is set, so a run cut short still leaves them):
#   env          nvidia-smi, versions
#   cudalib      only where dlmscope/libdlmscope_cuda.so is missing and nvcc exists: build it (sm_90)
#   import       dlmscope from the checkout (PYTHONPATH; no install, no C++ build: a GPU does not need it)
#   kernels      the kernel and op tests on CUDA (triton, chunked, cuda, torch), -m "not slow", hypothesis at 5
#                examples (profile "gpu")
#   correctness  benchmarks/gpu_correctness.py: fused encode vs float64 on 512 rows x the full n; decode and
#                backward vs the torch backend at B=2048 (target shape B·n = 2^31 stays out of this stage)
#   sweep        benchmarks/encode_sweep.py: the fused encoder at the shipped and Hopper-shaped tiles
#                (DLMSCOPE_ENCODE_TILE), the chunked encoder at 3 chunk sizes, torch — vs the GEMM, TFLOP/s
#   bench        benchmarks/report.py step --device cuda: GEMM floor, every encode variant, the step per backend,
#                peak memory (the dense reference baselines run in their own pytest process, last)
#   sanitize     compute-sanitizer (memcheck, then racecheck) over tests/backends/test_cuda_backend.py: out-of-bounds
#                accesses and shared-memory races in csrc/cuda on small shapes (skipped where the tool or the library
#                is absent)
#   rest         the rest of the suite on CUDA while time remains
#
# Knobs: GPU_CHECK_BUDGET_S (360; dry 300), GPU_CHECK_STAGES (comma list), GPU_CHECK_RESULTS (results dir,
# default benchmarks/results/gpu-check), BENCH_ARGS (extra `report.py step` arguments), PYTHON (python3).
# Wheels in .whl/ (for a machine without a package index) are installed into a side folder on PYTHONPATH first.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then DEVICE=cpu; DEFAULT_BUDGET=300; else DEVICE=cuda; DEFAULT_BUDGET=360; fi
BUDGET=${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET}
STAGES=${GPU_CHECK_STAGES:-env,cudalib,import,kernels,correctness,sweep,bench,sanitize,rest}
RESULTS=${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results/gpu-check}
RESERVE=15
START=$(date +%s)
mkdir -p "$RESULTS"
rm -f "$RESULTS"/*.log "$RESULTS"/summary.txt "$RESULTS"/junit-*.xml
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} DLMSCOPE_TEST_DEVICE=$DEVICE
export DLMSCOPE_HYPOTHESIS=gpu
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi

declare -A STATUS SECS
ORDER=()
elapsed() { echo $(( $(date +%s) - START )); }
want() { [[ ",$STAGES," == *",$1,"* ]]; }

summary() {
  {
    echo "gpu_check summary ($(date -u +%FT%TZ), device $DEVICE, dry=$DRY, ${BUDGET}s budget, $(elapsed)s used)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    for s in "${ORDER[@]}"; do printf '  %-12s %-30s %4ss\n' "$s" "${STATUS[$s]}" "${SECS[$s]}"; done
    for log in kernels rest; do
      [ -f "$RESULTS/$log.log" ] && echo "$log: $(grep -E '[0-9]+ (passed|failed)' "$RESULTS/$log.log" | tail -n 1)" \
        && grep -E '^(FAILED|ERROR) ' "$RESULTS/$log.log" | head -n 15
    done
    [ -f "$RESULTS/correctness.md" ] && cat "$RESULTS/correctness.md"
  } >"$RESULTS/summary.txt" 2>&1
}

# publish: the summary and every result file so far into $OUT where it is set (a folder that outlives the run,
# also after a timeout); small files as they are, everything in one archive as well
publish() {
  summary
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  cp "$RESULTS"/summary.txt "$RESULTS"/*.log "$RESULTS"/*.json "$RESULTS"/*.md "$RESULTS"/junit-*.xml "$OUT"/ 2>/dev/null
  tar -czf "$OUT/gpu_check_all.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null
  return 0
}

# stage NAME LIMIT_S CMD...: under timeout (SIGINT first so pytest still writes its summary), capped by the budget
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - $(elapsed) - RESERVE )) log="$RESULTS/$name.log"
  ORDER+=("$name")
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    STATUS[$name]="skipped (no time left)"; SECS[$name]=0; publish; return 0
  fi
  echo "== $name (limit ${limit}s, t=$(elapsed)s)"
  local t0=$(date +%s)
  timeout -s INT -k 15 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  SECS[$name]=$(( $(date +%s) - t0 ))
  local timed_out=0
  (( rc == 124 || rc == 137 || (rc != 0 && SECS[$name] >= limit) )) && timed_out=1
  if (( rc == 0 )); then STATUS[$name]=ok
  elif (( timed_out )) && [ "$name" = rest ]; then STATUS[$name]="partial (time ran out)"   # runs while time remains
  elif (( timed_out )); then STATUS[$name]="TIMEOUT after ${limit}s"
  else STATUS[$name]="FAILED (exit $rc)"; fi
  echo "   $name: ${STATUS[$name]} in ${SECS[$name]}s"; tail -n 4 "$log" | sed 's/^/   | /'
  publish
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$RESULTS/wheels.log" 2>&1 \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

env_info() {
  nvidia-smi || echo "no nvidia-smi"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|pytest-benchmark|hypothesis|transformers) ' || true
}
export -f env_info
export PY
want env && stage env 30 bash -c env_info
if want cudalib && [ "$DRY" != 1 ] && [ ! -f dlmscope/libdlmscope_cuda.so ] && command -v nvcc >/dev/null; then
  CUDA_ARCHS=90 stage cudalib 90 bash scripts/build_cuda.sh
fi
want import && stage import 60 "$PY" -c "import dlmscope; print(dlmscope.__file__); print('backends', dlmscope.available_backends())"

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o "addopts=-ra" --durations=10)
KERNEL_TESTS=(tests/kernels/test_triton_kernels.py tests/kernels/test_topk_select.py tests/kernels/test_transpose_reduce.py tests/test_ops.py
              tests/backends/test_cuda_backend.py)
if [ "$DRY" = 1 ]; then
  KERNEL_SEL=(-k "topk_encode_matches_reference or sparse_decode_matches")   # one slice: the script, not the suite
else
  KERNEL_SEL=()
fi
want kernels && stage kernels 150 "${PYTEST[@]}" "${KERNEL_TESTS[@]}" -m "not slow" "${KERNEL_SEL[@]}" \
  --junitxml="$RESULTS/junit-kernels.xml"

CORR_ARGS=(--out "$RESULTS"); [ "$DRY" = 1 ] && CORR_ARGS+=(--dry)
want correctness && stage correctness 90 "$PY" benchmarks/gpu_correctness.py "${CORR_ARGS[@]}"

SWEEP_ARGS=(--out "$RESULTS"); [ "$DRY" = 1 ] && SWEEP_ARGS+=(--dry)
want sweep && stage sweep 100 "$PY" benchmarks/encode_sweep.py "${SWEEP_ARGS[@]}"

if want bench; then
  left=$(( BUDGET - $(elapsed) - RESERVE - 80 ))       # keep 80 s for sanitize and the rest of the suite
  if [ "$DRY" = 1 ]; then BENCH=(--device cpu --quick --rounds 1 --warmup 0 --no-compile); else BENCH=(--device cuda); fi
  step_s=$(( left * 60 / 100 )); ops_s=$(( left * 35 / 100 ))
  # shellcheck disable=SC2086
  stage bench "$left" "$PY" benchmarks/report.py step "${BENCH[@]}" --out "$RESULTS" --timeout "$step_s,$ops_s" ${BENCH_ARGS:-}
fi

if want sanitize && [ "$DRY" != 1 ] && [ -f dlmscope/libdlmscope_cuda.so ] && command -v compute-sanitizer >/dev/null; then
  sanitize() {
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" -m pytest -q -p no:cacheprovider -x \
        tests/backends/test_cuda_backend.py || return $?
    done
  }
  export -f sanitize
  stage sanitize 75 bash -c sanitize
fi

if want rest && [ "$DRY" != 1 ]; then
  left=$(( BUDGET - $(elapsed) - RESERVE ))
  stage rest "$left" "${PYTEST[@]}" tests -m "not slow and not distributed" --continue-on-collection-errors \
    "${KERNEL_TESTS[@]/#/--ignore=}" --junitxml="$RESULTS/junit-rest.xml"
fi

publish
echo; cat "$RESULTS/summary.txt"
for s in "${ORDER[@]}"; do case ${STATUS[$s]} in ok|skipped*|partial*) ;; *) exit 1 ;; esac; done
exit 0
