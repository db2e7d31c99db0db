#!/usr/bin/env bash
# The GPU check in one run, for a GPU machine (also an offline one): the CUDA tests, `cifarnet bench`, the default
# 60-epoch training and its evaluation with and without flip TTA. About 9 minutes at most on one H100/H200: each
# step has a time budget (the whole stops by GPU_CHECK_DEADLINE, 570 s), a step that fails or runs out of time
# leaves the next ones running, and each step's result is written into OUT as soon as it exists, with
# summary.json rewritten after every step, so a run stopped from outside still leaves what it had done.
#
#   bench/gpu-check.sh [--cpu-dry-run] OUT [DATA]
#
# DATA: an image folder (train/<class>/*.jpg), a cifar-10-batches-py folder or archive, or the 16 MB
# cifar10-jpeg-train.tar.gz that bench/gpu-prepare.sh copies into .devdata/ (extracted into a temporary folder).
# Default: $CIFARNET_DATA; without data the training and evaluation steps are skipped.
#
# OUT receives at most six files: summary.json (each step's status, time and budget; the device; the headline
# figures and the project's GPU targets), check.log (everything the steps printed), tests.xml (JUnit, when
# pytest finishes), bench.json, train.json (train --json, wall time, the metrics of every epoch, also of an
# interrupted run) and evaluate.json (val and val with TTA).
#
# cifarnet runs from this checkout (src/ is put on PYTHONPATH; torch, torchvision, numpy and pillow must be
# installed); wheels in .whl/ (bench/gpu-prepare.sh) are installed into a temporary folder where their package is
# missing. Runs go to a temporary CIFARNET_HOME, so nothing of the user's is touched.
#
# --cpu-dry-run shrinks every step to seconds on the CPU (the CUDA tests are collected and skipped, bench runs
# at toy sizes, training 2 epochs) to check this script itself; tests/test_gpu_check.py runs it so.
# GPU_CHECK_BUDGET_<STEP>=SECONDS changes a step's budget (STEP: DEVICE, TESTS, BENCH, EXTRACT, TRAIN, EVALUATE,
# EVALUATE_TTA); GPU_CHECK_WHEELS=DIR takes the wheels from DIR instead of .whl/; PYTHON chooses the interpreter
# (default python3).
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--cpu-dry-run" ]; then
  dry_run=1
  shift
fi
out=${1:?usage: bench/gpu-check.sh [--cpu-dry-run] OUT [DATA]}
data=${2:-${CIFARNET_DATA:-}}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
absolute() { [ -e "$1" ] && echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" || echo "$1"; }
[ -n "$data" ] && data=$(absolute "$data")
wheels=$(absolute "${GPU_CHECK_WHEELS:-$(dirname "$0")/../.whl}")
cd "$(dirname "$0")/.." || exit 1
root=$PWD
py=${PYTHON:-python3}
started=$(date +%s)
deadline=$((started + ${GPU_CHECK_DEADLINE:-570}))

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$out/check.log"
: >"$log"
export CIFARNET_HOME="$work/home" PYTHONUNBUFFERED=1 PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_OUT="$out" GPU_CHECK_WORK="$work" GPU_CHECK_MODE=$([ $dry_run = 1 ] && echo cpu-dry-run || echo gpu)
unset CIFARNET_DATA  # the data is DATA, given here; evaluate reads the run's own record

if [ $dry_run = 1 ]; then
  # Seconds each step may take on a CPU, busy with other work too (on two idle cores each takes a few).
  budgets=(DEVICE=120 TESTS=120 BENCH=120 EXTRACT=30 TRAIN=120 EVALUATE=120 EVALUATE_TTA=120)
  cifarnet=("$py" bench/gpu_check_dry_run.py)
  bench_args="--device cpu --quick"
  train_args="--epochs 2 --batch-size 32 --device cpu"
  test_timeout=30
else
  budgets=(DEVICE=60 TESTS=150 BENCH=170 EXTRACT=15 TRAIN=150 EVALUATE=30 EVALUATE_TTA=30)
  cifarnet=("$py" -m cifarnet_cli)
  bench_args=""
  train_args=""
  test_timeout=90
fi

budget() {  # STEP: its budget in seconds (GPU_CHECK_BUDGET_<STEP> overrides), at most what is left before the deadline
  local default var left
  default=$(printf '%s\n' "${budgets[@]}" | sed -n "s/^$1=//p")
  var="GPU_CHECK_BUDGET_$1"
  left=$((deadline - $(date +%s)))
  local seconds=${!var:-$default}
  echo $((seconds < left ? seconds : left))
}

record() {  # STEP STATUS SECONDS BUDGET EXIT [NOTE]: one line of steps.tsv, then summary.json again
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >>"$work/steps.tsv"
  "$py" bench/gpu_check_summary.py >/dev/null 2>>"$log" || echo "(summary.json could not be written)" | tee -a "$log"
}

step() {  # STEP COMMAND (a bash command line): runs it within the step's budget, its output into check.log
  local name=$1 command=$2 seconds start rc status
  seconds=$(budget "$name")
  if [ "$seconds" -lt 1 ]; then
    record "$name" skipped 0 0 "" "no time left before the deadline"
    return
  fi
  printf '\n== %s (%s, budget %s s)\n' "$name" "$(date +%T)" "$seconds" | tee -a "$log"
  start=$(date +%s%N)
  # timeout signals the whole process group: SIGTERM first (training saves its last epoch), SIGKILL 10 s later.
  timeout -k 10 "$seconds" bash -c "$command" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status=timed-out ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$((($(date +%s%N) - start) / 1000000))e-3" "$seconds" "$rc"
}

# The steps run in bash -c: `cifarnet` is a function they inherit, the interpreter's path quoted inside it.
printf -v quoted '%q ' "${cifarnet[@]}"
eval "cifarnet() { $quoted \"\$@\"; }"
export -f cifarnet
export WHEELS="$wheels" PY="$py" BENCH_ARGS="$bench_args" TRAIN_ARGS="$train_args" TEST_TIMEOUT=$test_timeout

# -- device: the GPU, missing wheels, `cifarnet info` ----------------------------------------------------
step DEVICE '
  set -e
  if [ "$GPU_CHECK_MODE" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  fi
  if [ -d "$WHEELS" ]; then  # wheels from bench/gpu-prepare.sh: only those whose package is missing here
    missing=$("$PY" -c "
import importlib.metadata as md, pathlib, sys
for whl in sorted(pathlib.Path(sys.argv[1]).glob(\"*.whl\")):
    try:
        md.version(whl.name.split(\"-\")[0])
    except md.PackageNotFoundError:
        print(whl)
" "$WHEELS")
    if [ -n "$missing" ]; then
      echo "installing what is missing: $(echo $missing | xargs -n1 basename | tr "\n" " ")"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$GPU_CHECK_WORK/site" $missing
      export PYTHONPATH="$PYTHONPATH:$GPU_CHECK_WORK/site"
    fi
  fi
  cifarnet info --json >"$GPU_CHECK_WORK/info.json"
  "$PY" -c "
import json, sys
info = json.load(open(sys.argv[1]))
print(\"torch\", info[\"torch\"], \"CUDA\", info[\"cuda_version\"], \"available:\", info[\"cuda_available\"])
print(*(d.get(\"name\") for d in info[\"devices\"]), sep=\", \")
sys.exit(sys.argv[2] == \"gpu\" and not info[\"cuda_available\"])
" "$GPU_CHECK_WORK/info.json" "$GPU_CHECK_MODE"
'
if [ -d "$work/site" ]; then
  export PYTHONPATH="$PYTHONPATH:$work/site"
fi

# -- the CUDA tests --------------------------------------------------------------------------------------
# Only the CUDA test module (the others need the dev extras); third-party pytest plugins stay out. Each test
# has its own limit, and -v prints each result as it comes, so a run stopped at the step's budget still says
# which tests passed.
step TESTS '
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest -m cuda -v -p no:cacheprovider --test-timeout "$TEST_TIMEOUT" \
    --junitxml="$GPU_CHECK_OUT/tests.xml" tests/test_cuda.py
'

# -- cifarnet bench --------------------------------------------------------------------------------------
step BENCH 'cifarnet bench $BENCH_ARGS --json --output "$GPU_CHECK_OUT/bench.json" >/dev/null'

# -- training and evaluation -----------------------------------------------------------------------------
if [ -z "$data" ]; then
  for name in EXTRACT TRAIN EVALUATE EVALUATE_TTA; do
    record "$name" skipped 0 0 "" "no DATA given (a data folder or cifar10-jpeg-train.tar.gz)"
  done
else
  if [[ "$data" == *cifar10-jpeg*.tar.gz ]]; then
    export ARCHIVE=$data
    step EXTRACT 'tar -xzf "$ARCHIVE" -C "$GPU_CHECK_WORK" && ls -d "$GPU_CHECK_WORK/cifar10-jpeg"'
    data="$work/cifar10-jpeg"
  else
    record EXTRACT skipped 0 0 "" "DATA is not an archive"
  fi
  export DATA=$data
  step TRAIN 'cifarnet train --data-dir "$DATA" --run gpu-check $TRAIN_ARGS --json >"$GPU_CHECK_WORK/train.json"'
  step EVALUATE 'cifarnet evaluate gpu-check --split val --json >"$GPU_CHECK_WORK/evaluate.json"'
  step EVALUATE_TTA 'cifarnet evaluate gpu-check --split val --tta --json >"$GPU_CHECK_WORK/evaluate-tta.json"'
fi

printf '\n== summary (%s s in all)\n' "$(($(date +%s) - started))" | tee -a "$log"
cat "$out/summary.json"
"$py" -c 'import json, sys; sys.exit(any(s["status"] in ("failed", "timed-out") for s in json.load(open(sys.argv[1]))["steps"].values()))' "$out/summary.json"
