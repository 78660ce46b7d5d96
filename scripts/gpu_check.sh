#!/usr/bin/env bash
# gpu_check.sh — everything a freshly lent GPU machine should run, in ONE device call of at most 10 minutes.
#
#   make gpu-check                         # = bash scripts/gpu_check.sh
#
# From a session with the device tool (the command must fit in 2000 characters; use timeout_s=600):
#
#   run(command="bash scripts/gpu_check.sh", timeout_s=600)                       # all phases
#   run(command="GPU_CHECK_PHASES=env,install,bench bash scripts/gpu_check.sh")     # benchmarks only
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)       # with carried wheels
#
# Phases (each under its own `timeout`, so one hang cannot eat the call; a failed phase does not stop the
# next; a status table is printed at the end):
#   env      nvidia-smi, python / torch / triton versions, which test plugins exist
#   install  carried wheels from .whl/ (if any) into /tmp/site, then `pip install --no-build-isolation
#            --no-deps -e .` (works offline with the image's torch 2.11 / triton 3.6); if dlmscope._C still
#            does not import from the checkout, `python setup.py build_ext --inplace` as a fallback
#   test     DLMSCOPE_TEST_DEVICE=cuda pytest tests -m "not distributed" (TRITON_INTERPRET unset, so the
#            triton backend compiles real kernels) -> junit.xml + tests.log
#   bench    python benchmarks/report.py --device cuda -> benchmarks/results/cuda-<shape>.{json,md} + bench.log
# Results: benchmarks/results/ (JSON + markdown), logs in benchmarks/results/gpu-check/, and when $OUT is set
# (the device tool brings back at most 8 files) exactly these 8: summary.txt install.log tests.log junit.xml
# bench.log cuda-<shape>.json cuda-<shape>.md gpu_check_all.tar.gz (everything, env.txt included).
#
# Knobs (environment):
#   GPU_CHECK_PHASES     comma list of env,install,test,bench            (default: all four)
#   GPU_CHECK_BUDGET_S   wall-clock budget of the whole script            (default 570: the call limit is 600)
#   GPU_CHECK_INSTALL_S  install phase limit                              (default 240)
#   GPU_CHECK_TEST_S     test phase limit                                 (default 150)
#   the bench phase gets whatever time is left (minus a reserve for copying results), split between the step
#   and op benchmarks; BENCH_ARGS adds arguments to report.py (e.g. "--shape 8192,2048,65536,64 --no-compile").
#   PYTHON               interpreter (default python3: on the lent image that is the one holding torch)
#
# hypothesis: the lent image's package list (/work/.library/device/KINDS.md) includes hypothesis, pytest-timeout
# and pytest-benchmark. If a future image lacks one, carry its wheel: in the repo root here run
#   echo /.whl/ >> .git/info/exclude      # (.gitignore already ignores /.whl/)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl hypothesis==6.155.2 sortedcontainers==2.4.0
# (both pure Python; hypothesis needs nothing else on Python 3.12) and call the tool with
# carry=[".whl"]; this script installs .whl/*.whl into /tmp/site and puts it on PYTHONPATH. Without it, test
# modules that import hypothesis fail to collect and the rest of the suite still runs
# (--continue-on-collection-errors); the summary says so.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
export PY
BUDGET=${GPU_CHECK_BUDGET_S:-570}
PHASES=${GPU_CHECK_PHASES:-env,install,test,bench}
T_INSTALL=${GPU_CHECK_INSTALL_S:-240}
T_TEST=${GPU_CHECK_TEST_S:-150}
RESERVE=20
START=$(date +%s)
RESULTS=$ROOT/benchmarks/results
LOGDIR=$RESULTS/gpu-check
mkdir -p "$LOGDIR"
rm -f "$LOGDIR"/*.log "$LOGDIR"/junit.xml "$LOGDIR"/summary.txt "$LOGDIR"/env.txt
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}   # cpu only to dry-run this script on a machine without a GPU
export DLMSCOPE_TEST_DEVICE=$DEVICE   # the test suite picks its devices from this
MARK=$(mktemp /tmp/gpu_check_start.XXXXXX)   # results newer than this were written by this run

declare -A STATUS SECS
ORDER=()
elapsed() { echo $(( $(date +%s) - START )); }
want() { [[ ",$PHASES," == *",$1,"* ]]; }

# run_phase NAME LIMIT_S LOGFILE CMD...: run under timeout (the whole process group is killed at the limit),
# capped by what is left of the budget; record ok / FAILED(rc) / TIMEOUT / skipped.
run_phase() {
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( BUDGET - $(elapsed) - RESERVE ))
  ORDER+=("$name")
  if (( limit > left )); then limit=$left; fi
  if (( limit < 15 )); then
    STATUS[$name]="skipped (no time left)"; SECS[$name]=0
    echo "== $name: skipped, ${left}s left of the ${BUDGET}s budget" | tee -a "$log"
    return 0
  fi
  echo "== $name (limit ${limit}s, t=$(elapsed)s) -> $log"
  local t0=$(date +%s) rc
  local sig=${PHASE_SIGNAL:-TERM}
  if declare -F "$1" >/dev/null; then   # a shell function: timeout needs a program, so run it in bash -c
    export -f "$1"
    timeout -s "$sig" -k 20 "$limit" bash -c "$*" >>"$log" 2>&1
  else
    timeout -s "$sig" -k 20 "$limit" "$@" >>"$log" 2>&1
  fi
  rc=$?
  SECS[$name]=$(( $(date +%s) - t0 ))
  case $rc in
    0) STATUS[$name]="ok" ;;
    124|137) STATUS[$name]="TIMEOUT after ${limit}s" ;;
    2|130) if [ "$sig" = INT ] && (( $(date +%s) - t0 >= limit )); then STATUS[$name]="TIMEOUT after ${limit}s (interrupted)"; else STATUS[$name]="FAILED (exit $rc)"; fi ;;
    *) STATUS[$name]="FAILED (exit $rc)" ;;
  esac
  echo "   $name: ${STATUS[$name]} in ${SECS[$name]}s; last lines:"
  tail -n 8 "$log" | sed 's/^/   | /'
  return 0
}

# ---- wheels carried from this repo's .whl/ (see the header) -------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
       >"$LOGDIR/wheels.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "   carried wheels FAILED to install (see wheels.log)"; tail -n 5 "$LOGDIR/wheels.log"
  fi
fi

# ---- env ------------------------------------------------------------------------------------------------
env_info() {
  set -x
  nvidia-smi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  nproc; free -g
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  "$PY" -c "import triton; print('triton', triton.__version__)"
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|pytest-benchmark|pytest-timeout|hypothesis|setuptools|pybind11|ninja|numpy|safetensors|transformers) '
  set +x
}
if want env; then run_phase env 60 "$LOGDIR/env.txt" env_info; fi

# ---- install --------------------------------------------------------------------------------------------
install_pkg() {
  local ok=0
  "$PY" -m pip install --no-build-isolation --no-deps -e . || ok=1
  if [ -d csrc ] && ! "$PY" -c "import dlmscope._C" 2>/dev/null; then
    echo "-- dlmscope._C does not import from the checkout; building it in place"
    "$PY" setup.py build_ext --inplace -j "$MAX_JOBS" && ok=0 || ok=1
  fi
  "$PY" -c "import dlmscope, torch; print('dlmscope from', dlmscope.__file__); print('available backends:', dlmscope.available_backends())" || ok=1
  "$PY" -c "from dlmscope.backends import _import_errors as e; import dlmscope; dlmscope.available_backends(); [print('  not available:', k, '-', v) for k, v in e.items()]" || true
  return $ok
}
if want install; then run_phase install "$T_INSTALL" "$LOGDIR/install.log" install_pkg; fi

# ---- tests on CUDA ----------------------------------------------------------------------------------------
if want test; then
  TEST_ARGS=(-m "not distributed" -q -p no:cacheprovider -o "addopts=-ra" --durations=10 --continue-on-collection-errors
             --junitxml="$LOGDIR/junit.xml")
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then TEST_ARGS+=(--timeout=120); fi
  if ! "$PY" -c "import hypothesis" 2>/dev/null; then
    echo "!! hypothesis is missing: its test modules will fail to collect; carry its wheel (see this script's header)" \
      | tee -a "$LOGDIR/tests.log"
  fi
  if [ -n "$(find tests -name 'test_*.py' 2>/dev/null | head -n 1)" ]; then
    # SIGINT at the limit: pytest then stops like on Ctrl-C and still writes its summary and junit.xml
    PHASE_SIGNAL=INT run_phase test "$T_TEST" "$LOGDIR/tests.log" "$PY" -m pytest tests "${TEST_ARGS[@]}"
  else
    ORDER+=(test); STATUS[test]="skipped (no tests/test_*.py)"; SECS[test]=0
  fi
fi

# ---- benchmarks -------------------------------------------------------------------------------------------
if want bench; then
  left=$(( BUDGET - $(elapsed) - RESERVE ))
  # the step benchmarks (the headline table) get ~60% of the bench time, the op benchmarks the rest
  step_s=$(( (left - 20) * 60 / 100 )); ops_s=$(( (left - 20) * 40 / 100 ))
  (( step_s < 30 )) && step_s=30; (( ops_s < 20 )) && ops_s=20
  # shellcheck disable=SC2086
  run_phase bench "$left" "$LOGDIR/bench.log" "$PY" benchmarks/report.py --device "$DEVICE" --out "$RESULTS" \
    --timeout "$step_s,$ops_s" ${BENCH_ARGS:-}
fi

# ---- summary and results ----------------------------------------------------------------------------------
{
  echo "gpu_check summary ($(date -u +%FT%TZ), ${BUDGET}s budget, $(elapsed)s used)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  for p in "${ORDER[@]}"; do printf '  %-8s %-28s %4ss\n' "$p" "${STATUS[$p]}" "${SECS[$p]}"; done
  if [ -f "$LOGDIR/tests.log" ]; then
    echo "tests: $(grep -E '(passed|failed|error|skipped)' "$LOGDIR/tests.log" | tail -n 1)"
    grep -E '^(FAILED|ERROR) ' "$LOGDIR/tests.log" | head -n 25
  fi
  if [ -f "$LOGDIR/bench.log" ]; then
    sed -n '/^== dlmscope benchmark/,/^== end of summary/p' "$LOGDIR/bench.log"
  fi
} >"$LOGDIR/summary.txt" 2>&1
MD=$(find "$RESULTS" -maxdepth 1 -name "$DEVICE-*.md" -newer "$MARK" 2>/dev/null | head -n 1)
JS=""
if [ -n "$MD" ]; then
  JS=${MD%.md}.json
  { echo; cat "$MD"; } >>"$LOGDIR/summary.txt"
fi
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in summary.txt install.log tests.log junit.xml bench.log; do
    [ -f "$LOGDIR/$f" ] && cp "$LOGDIR/$f" "$OUT/"
  done
  [ -n "$MD" ] && cp "$MD" "$JS" "$OUT/" 2>/dev/null
  tar -czf "$OUT/gpu_check_all.tar.gz" -C "$RESULTS" gpu-check $( [ -n "$MD" ] && basename "$MD") \
    $( [ -n "$JS" ] && [ -f "$JS" ] && basename "$JS") 2>/dev/null
fi
echo
cat "$LOGDIR/summary.txt"
for p in "${ORDER[@]}"; do [ "${STATUS[$p]}" = ok ] || exit 1; done
exit 0
