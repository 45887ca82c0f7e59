#!/usr/bin/env bash
# The GPU check: on an H100/H200 machine (no network; torch, Triton, ninja, pytest already there) build the
# extension in place for that GPU, run the GPU tests, a compute-sanitizer pass over the CUDA C++ kernels,
# the kernel benchmarks and the model benchmark; write logs and JSON under OUT; print a pass/fail and speed
# table last. Steps run in priority order, each with its own limit, and the whole run keeps within
# FASTNETS_GPU_CHECK_SECONDS (default 410 s, so that with the machine's start a rerun still fits);
# what the budget leaves out is marked SKIP(budget): run those steps in a second call.
#
#   bash benchmarks/gpu_check.sh OUT [steps...]     steps: build info tests bn conv se sanitizer slow models
#
# With no steps, all of them run. `models` (python -m fastnets.bench --profile quick) takes most of the
# time; run it alone in a second call when the kernel steps need the first. For its CIFAR-10 training,
# copy ../shared/data/cifar10_jpeg.npz into .data/ (ignored by git) and carry `.data` to the GPU machine
# (with mnist.npz too the carry passes the 64 MiB limit).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu_check}
shift || true
STEPS=${*:-build info tests bn conv se sanitizer slow models}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
# The whole run's budget (seconds): a step gets at most what is left, and is skipped with under 20 s left.
BUDGET=${FASTNETS_GPU_CHECK_SECONDS:-410}
START=$(date +%s)

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    printf '%-10s %-12s %4ss  %s\n' "$name" "SKIP(budget)" 0 "-" >> "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=PASS
  [ $rc -eq 124 ] && verdict=TIMEOUT
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAIL(rc=$rc)"
  printf '%-10s %-12s %4ss  %s\n' "$name" "$verdict" "$(( $(date +%s) - t0 ))" "$OUT/$name.log" >> "$SUMMARY"
  tail -n 3 "$OUT/$name.log"
}

step build 240 pip install --no-build-isolation --no-deps -e .
step info 60 python -m fastnets.info
step tests 200 python -m pytest -q -rfE -p no:cacheprovider -m "not slow" tests --junitxml="$OUT/tests.xml"
step bn 150 python benchmarks/bench_batch_norm.py --quick --out "$OUT"
[ -f benchmarks/bench_conv.py ] && step conv 150 python benchmarks/bench_conv.py --quick --out "$OUT"
[ -f benchmarks/bench_squeeze_excite.py ] && step se 90 python benchmarks/bench_squeeze_excite.py --quick --out "$OUT"
if command -v compute-sanitizer >/dev/null; then
  # memcheck over one short run of each CUDA C++ kernel path (BatchNorm, squeeze-excite); an error fails the step
  step sanitizer 180 bash -c 'compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -x \
      -p no:cacheprovider tests/test_cuda_extension.py -m "not slow" -k "unaligned or (op_and_all_gradients and float32)" \
    && compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -x -p no:cacheprovider \
      tests/test_squeeze_excite.py -k "cuda and (unaligned or block_matches)"'
else
  case " $STEPS " in *" sanitizer "*) echo "sanitizer  SKIP         compute-sanitizer not found" >> "$SUMMARY" ;; esac
fi
step slow 120 python -m pytest -q -rfE -p no:cacheprovider -m slow tests
DATA_ARGS=()
[ -d .data ] && DATA_ARGS=(--data .data)
step models 360 python -m fastnets.bench --profile quick --no-progress --out "$OUT/bench" "${DATA_ARGS[@]}"

echo
echo "==== GPU check summary ($(python -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null))"
cat "$SUMMARY"
python benchmarks/summarize.py "$OUT" 2>/dev/null || true
