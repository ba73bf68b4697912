#!/usr/bin/env bash
# The GPU check kit: everything graphdelta needs a GPU to check, in one device call of under 10
# minutes, most informative first. Each step writes its log into $OUT as it runs and has its own
# time limit, so a step that hangs or a call that times out still returns what ran.
#
#   1 env        nvidia-smi, versions, the device's limits, the tools present
#   2 configs    every autotune config of every kernel compiled, run and checked against the
#                PyTorch path, sharded over processes, with a bitwise-repeat check for races
#                (tools/gpu_configs.py), and the shared-memory estimate against the compiler
#   3 tests      the GPU tests: kernels, domain, runtime graphs, tests/test_compile_cuda.py
#                (kv, vk and bf16), with GRAPHDELTA_AUTOTUNE=0
#   4 replay     the runtime's CUDA-graph decode against eager, window buckets, the MoE dispatch
#                per device, sampling on the device, time per step (tools/gpu_replay.py)
#   5 sanitizer  compute-sanitizer memcheck over every kernel on small shapes (tools/gpu_sanitize.py)
#   6 bench      benchmarks/kernels.py: roofline, decode replayed at batch 1/64/256 (the tile
#                sweep too with GPU_CHECK_SWEEP=1), prefill T=4k-32k against transformers and fla
#                (if its wheel came along); last, since it only measures, with what is left
#
# The first run on a GPU (2026-12-04, BENCHMARKS.md) set the caps: the tests took over 160 s
# with 14 workers, the configs about 150 s over 14 shards (130 s reach most of them; config 0 of
# every kernel comes first), the sanitizer 29 s; the replay had not finished its first check
# after 43 s. What is left, about 75 s, goes to the bench.
#
# Usage:
#   tools/gpu_check.sh          on the GPU machine (README, "GPU check kit", for the device call)
#   GPU_CHECK_STEPS="4_replay 6_bench" GPU_CHECK_BUDGET=220 tools/gpu_check.sh
#                               a rerun of chosen steps, after a fix, in what is left of a lease
#   tools/gpu_check.sh --dry    here, without a GPU: every step on the CPU (the Triton interpreter,
#                               tiny shapes), to prove the kit before a lease is spent on it
#
# $OUT receives at most 8 files: summary.txt, one log per step, results.tgz (the JSON, Markdown
# and plots of every step). Without $OUT they go to /tmp/gpu_check_out.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; fi
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
BUDGET=${GPU_CHECK_BUDGET:-550}  # seconds for all steps: the device call runs with timeout_s 580
SCALE=1  # of each step's cap: the CPU and the interpreter are far slower than the GPU machine
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  SCALE=5
  BUDGET=${GPU_CHECK_BUDGET:-2400}
fi
START=$SECONDS
PY=${PYTHON:-python3}
REPO=$PWD
export PYTHONUNBUFFERED=1 GRAPHDELTA_BENCH_RESULTS=$WORK/bench TRITON_CACHE_DIR=$WORK/triton-cache
# the machine's cores, counted once (nproc --all: a plain nproc obeys the OMP_NUM_THREADS=1 below,
# and gave the first run on a GPU one configs shard, not 14, which timed out a quarter done)
CORES=$(nproc --all)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} REPO WORK PY DRY CORES

# graphdelta without installing it (the device machine has no network and its own torch): a
# package folder of links, first on PYTHONPATH (graphdelta.lowering and .passes are top-level
# folders here, mapped into the package by pyproject.toml). Every step runs from /tmp, not from
# the repository, so that the bare ./graphdelta folder cannot shadow it.
mkdir -p "$WORK/pkg/graphdelta"
for f in graphdelta/* lowering passes; do ln -s "$REPO/$f" "$WORK/pkg/graphdelta/"; done
export PYTHONPATH=$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}

# fla, if its wheel was carried (README: .whl/), goes into /tmp/site for the benchmark only:
# with fla importable, transformers' own layers switch to fla's kernels, which the tests avoid.
FLA_PATH=""
if ls .whl/*.whl > /dev/null 2>&1; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > "$WORK/wheels.log" 2>&1; then
    FLA_PATH=/tmp/site
  fi
fi
export FLA_PATH

SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# chosen NAME: whether GPU_CHECK_STEPS (unset: every step) names step NAME
chosen() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ " $GPU_CHECK_STEPS " == *" $1 "* ]]; }
for s in ${GPU_CHECK_STEPS:-}; do
  case $s in 1_env|2_configs|3_tests|4_replay|5_sanitizer|6_bench) ;;
    *) echo "GPU_CHECK_STEPS: no step $s (1_env 2_configs 3_tests 4_replay 5_sanitizer 6_bench)" >&2; exit 2 ;;
  esac
done

# step NAME CAP FUNCTION: run FUNCTION with at most CAP seconds (less if the budget is short),
# its output into $OUT/NAME.log, its verdict and the log's last lines into the summary.
step() {
  local name=$1 cap=$(($2 * SCALE)) fn=$3
  if ! chosen "$name"; then
    say "== $name: not chosen (GPU_CHECK_STEPS)"
    return
  fi
  local left=$((BUDGET - (SECONDS - START) - 5))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 5 ]; then
    say "== $name: SKIPPED (the budget of ${BUDGET}s is spent)"
    return
  fi
  local t0=$SECONDS rc verdict
  echo "== $name (at most ${limit}s) ..."
  (cd /tmp && timeout -k 5 "$limit" bash -c "$fn") > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) verdict=ok ;;
    124|137) verdict="TIMEOUT after ${limit}s" ;;
    *) verdict="FAIL (exit $rc)" ;;
  esac
  say "== $name: $verdict in $((SECONDS - t0))s"
  tail -n "${TAIL:-14}" "$OUT/$name.log" | sed 's/^/   /' | tee -a "$SUMMARY"
  (cd "$WORK" && tar czf "$OUT/results.tgz" --exclude triton-cache --exclude pkg . 2> /dev/null)
}

env_step() {
  date -u
  nvidia-smi || echo "no nvidia-smi"
  uname -a; echo "$CORES cores"; free -g | head -2
  which nvcc compute-sanitizer ncu cuobjdump || true
  $PY -m pip list 2> /dev/null | grep -iE "^(torch|triton|transformers|numpy|pytest|pytest-xdist|hypothesis|einops) " || true
  if [ -n "$FLA_PATH" ]; then PYTHONPATH=$FLA_PATH:$PYTHONPATH $PY -c "import fla; print('fla', fla.__version__)"
  else echo "fla: no wheel carried"; fi
  $PY - << 'PYEOF'
import sys, torch, triton, transformers
import graphdelta
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "graphdelta from", graphdelta.__file__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    from triton.runtime import driver
    props = driver.active.utils.get_device_properties(0)
    print("device", p.name, "sm", p.major, p.minor, "SMs", p.multi_processor_count, "memory GiB",
          round(p.total_memory / 2**30, 1), "shared per block (opt-in)", props.get("max_shared_mem"),
          "devices", torch.cuda.device_count())
PYEOF
}

configs_step() {
  mkdir -p "$WORK/configs"
  local n args=""
  if [ "$DRY" = 1 ]; then n=2; args="--device cpu --tiny"; else n=$(( CORES > 16 ? 14 : CORES - 2 )); fi
  [ "$n" -lt 1 ] && n=1
  local pids=() failed=0
  for i in $(seq 0 $((n - 1))); do
    $PY "$REPO/tools/gpu_configs.py" $args --shard "$i/$n" --out "$WORK/configs/shard-$i.jsonl" \
      > "$WORK/configs/shard-$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do  # (timeout signals the whole process group: the shards stop with it)
    if ! wait "${pids[$i]}"; then
      failed=$((failed + 1))
      echo "shard $i failed; its log ends:"; tail -n 5 "$WORK/configs/shard-$i.log"
    fi
  done
  echo "$n shards done, $failed failed; the table follows"
  [ "$failed" -eq 0 ]
}

tests_step() {
  local t=$REPO/tests files par=""
  files="$t/test_triton_chunk.py $t/test_triton_recurrent.py $t/test_triton_conv.py $t/test_norm.py $t/test_domain.py
    $t/test_compile_cuda.py $t/test_validation.py $t/test_ops.py $t/test_autotune.py
    $t/test_runtime.py::test_cuda_graph_replay_equals_eager_and_addresses_never_change"
  # -v: each test's verdict as it ends, so that a step stopped at its cap still names its failures
  if $PY -c "import xdist" 2> /dev/null; then par="-v -n $(( CORES >= 16 ? 14 : 8 )) --dist load"; fi
  # a test over 150 s fails with its stack (pytest-timeout, on the image) rather than running into
  # the step's cap unnamed: in the first run 3 of 227 tests had not ended when the cap came
  if $PY -c "import pytest_timeout" 2> /dev/null; then par="${par:--q} --timeout 150"; fi
  local pytest="$PY -m pytest -c $REPO/pyproject.toml --rootdir $REPO -p no:cacheprovider"
  if [ "$DRY" = 1 ]; then  # the selection collects, and the device-placement tests run interpreted
    $pytest -q --collect-only $files | tail -n 3
    $pytest -q $t/test_triton_chunk.py -k "fixed_cases and (wide or varlen)" $t/test_compile_cuda.py
  else
    GRAPHDELTA_AUTOTUNE=0 $pytest -rfE --durations=15 ${par:--q} $files
  fi
}

replay_step() {
  export GRAPHDELTA_AUTOTUNE=0  # correctness and relative step times: no tuning within its cap
  if [ "$DRY" = 1 ]; then $PY "$REPO/tools/gpu_replay.py" --device cpu --json "$WORK/replay.json"
  else $PY "$REPO/tools/gpu_replay.py" --json "$WORK/replay.json"; fi
}

bench_step() {
  # the decode tiles are chosen (lowering/triton_recurrent.py); the sweep that chose them took
  # over 100 s of the first run's 120, and left the prefill comparison out
  local args="--repeats 5" path=${FLA_PATH:+$FLA_PATH:}$PYTHONPATH
  if [ "${GPU_CHECK_SWEEP:-0}" = 1 ]; then args="$args --sweep"; fi
  if [ "$DRY" = 1 ]; then args="--quick --sweep --repeats 1"; fi
  PYTHONPATH=$path $PY "$REPO/benchmarks/kernels.py" $args 2>&1 | tee "$WORK/bench.out"
  local rc=${PIPESTATUS[0]}
  echo "-- the roofline, prefill and the default decode tiles:"
  grep -E "^roofline: copy|^\| (GDN|KDA|decode B=[0-9]+ (kv|vk) \|)" "$WORK/bench.out"
  return "$rc"
}

sanitizer_step() {
  if [ "$DRY" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
    echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not here'); the kernels run unsanitized:"
    if [ "$DRY" = 1 ]; then $PY "$REPO/tools/gpu_sanitize.py" --device cpu; else $PY "$REPO/tools/gpu_sanitize.py"; fi
  else
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 GRAPHDELTA_AUTOTUNE=0 compute-sanitizer --tool memcheck --error-exitcode 3 \
      --print-limit 20 $PY "$REPO/tools/gpu_sanitize.py"
    local rc=$?
    # 3: memcheck found an error. Anything else failed before the kernels (a sandboxed machine's
    # driver may refuse the sanitizer: "Device not supported"): run them unsanitized instead.
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
      echo "compute-sanitizer exited $rc before any report; the kernels run unsanitized:"
      GRAPHDELTA_AUTOTUNE=0 $PY "$REPO/tools/gpu_sanitize.py" || return $?
      return 4  # the kernels ran, the sanitizer did not: not a pass
    fi
    return "$rc"
  fi
}

export -f env_step configs_step tests_step replay_step bench_step sanitizer_step
say "graphdelta GPU check kit, $(git log -1 --format='%h %s' 2> /dev/null | cut -c1-72), $(date -u '+%Y-%m-%d %H:%M UTC'),\
 budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', DRY RUN (CPU, interpreter)')"
step 1_env 30 env_step
step 2_configs 130 configs_step
if chosen 2_configs; then
  (cd /tmp && timeout 60 $PY "$REPO/tools/gpu_configs.py" --summary "$WORK"/configs/shard-*.jsonl) >> "$OUT/2_configs.log" 2>&1
  grep -E "^\||jobs, " "$OUT/2_configs.log" | tee -a "$SUMMARY"
fi
step 3_tests 200 tests_step
step 4_replay 90 replay_step
step 5_sanitizer 40 sanitizer_step
step 6_bench 120 bench_step
say "total $((SECONDS - START))s; logs and results.tgz in $OUT"
