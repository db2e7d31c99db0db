#!/usr/bin/env bash
# The GPU proof in one run: the CUDA tests, `cifarnet bench`, the default 60-epoch training and its evaluation
# (with and without flip TTA). Writes JSON (and the test report) into OUT; prints a summary at the end.
# About 5 minutes on one H100/H200.
#
#   bench/gpu-check.sh OUT [DATA]
#
# DATA: an image folder (train/<class>/*.jpg), a cifar-10-batches-py folder or archive, or the 16 MB
# cifar10-jpeg-train.tar.gz of ../shared/datasets (extracted into a temporary folder). Default: $CIFARNET_DATA.
# cifarnet must be importable (pip install -e . or --no-deps -e . beside torch); runs go to a temporary
# CIFARNET_HOME so nothing of the user's is touched.
set -uo pipefail
out=${1:?usage: bench/gpu-check.sh OUT [DATA]}
data=${2:-${CIFARNET_DATA:-}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
status=0
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
fail() { echo "FAILED: $1"; status=1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CIFARNET_HOME="$work/home" PYTHONUNBUFFERED=1

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
$py -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))' || exit 1
$py -m cifarnet_cli info --json >"$out/info.json" || fail "info"

step "CUDA tests (pytest -m cuda)"
# Only the CUDA test module: collecting the others would need the dev extras (cryptography, ...).
timeout 600 $py -m pytest -m cuda -q -p no:cacheprovider --junitxml="$out/cuda-tests.xml" tests/test_cuda.py 2>&1 | tail -25 || fail "CUDA tests"

step "cifarnet bench"
timeout 600 $py -m cifarnet_cli bench --json --output "$out/bench.json" >/dev/null || fail "bench"

if [ -n "$data" ]; then
  if [[ "$data" == *cifar10-jpeg*.tar.gz ]]; then
    step "extract $data"
    tar -xzf "$data" -C "$work" && data="$work/cifar10-jpeg" || fail "extract"
  fi
  step "cifarnet train (default recipe, 60 epochs) on $data"
  start=$(date +%s%N)
  timeout 900 $py -m cifarnet_cli train --data-dir "$data" --run gpu-check --json >"$out/train.json" || fail "train"
  ms=$((($(date +%s%N) - start) / 1000000))
  printf '{"train_wall_seconds": %d.%03d}\n' $((ms / 1000)) $((ms % 1000)) >"$out/train-wall.json"
  step "cifarnet evaluate --split val (and --tta)"
  $py -m cifarnet_cli evaluate gpu-check --split val --json >"$out/evaluate.json" || fail "evaluate"
  $py -m cifarnet_cli evaluate gpu-check --split val --tta --json >"$out/evaluate-tta.json" || fail "evaluate --tta"
  cp "$CIFARNET_HOME/runs/gpu-check/metrics.jsonl" "$out/metrics.jsonl" 2>/dev/null || true
else
  echo "no DATA: skipping the 60-epoch training (pass a data folder or cifar10-jpeg-train.tar.gz)"
fi

gpus=$($py -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${gpus:-0}" -ge 2 ]; then
  # bench above already measured the default recipe on every GPU (its "distributed" entry); here the
  # multi-process tests (gloo on the CPU) and a short NCCL training of every GPU against one.
  step "distributed: tests/test_distributed.py (gloo) and a 3-epoch run on 2 GPUs against one"
  timeout 600 $py -m pytest -q -p no:cacheprovider tests/test_distributed.py 2>&1 | tail -5 || fail "distributed tests"
  if [ -n "$data" ]; then
    # 512 × 1 is re-cut to 256 × 2 for two processes; one GPU trains the same with 256 × 2, eagerly.
    timeout 600 $py -m cifarnet_cli train --data-dir "$data" --device cuda:0,1 --epochs 3 --run gpu-ddp --json \
      >"$out/ddp-train.json" || fail "train --device cuda:0,1"
    timeout 600 $py -m cifarnet_cli train --data-dir "$data" --device cuda:0 --capture off --epochs 3 --run gpu-one \
      --batch-size 256 --accum 2 --json >"$out/ddp-reference.json" || fail "train on one GPU"
    cp "$CIFARNET_HOME/runs/gpu-ddp/metrics.jsonl" "$out/ddp-metrics.jsonl" 2>/dev/null || true
    cp "$CIFARNET_HOME/runs/gpu-one/metrics.jsonl" "$out/ddp-reference-metrics.jsonl" 2>/dev/null || true
  fi
else
  echo "fewer than 2 GPUs: the distributed path runs on the CPU only (tests/test_distributed.py)"
fi

step "summary"
$py - "$out" <<'EOF' | tee "$out/summary.json"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
bench, train = load("bench.json") or {}, load("train.json") or {}
ev, tta = load("evaluate.json") or {}, load("evaluate-tta.json") or {}
rows = [r for r in bench.get("train", []) if r["batch_size"] == 512]
summary = {
    "gpu": (bench.get("environment") or {}).get("gpu"),
    "bench_train_batch512": {f"{r['precision']} {'graph' if r['capture'] else 'eager'}": r["images_per_second"] for r in rows},
    "capture_speedup": bench.get("capture_speedup"),
    "full_epoch_images_per_second": (bench.get("full_epoch") or {}).get("images_per_second"),
    "predict": bench.get("predict"),
    "finetune": {k: (bench.get("finetune") or {}).get(k) for k in ("images_per_second", "peak_memory_bytes")},
    "train_60_epochs_seconds": None,  # training steps only (metrics.jsonl epoch_seconds)
    "train_wall_seconds": (load("train-wall.json") or {}).get("train_wall_seconds"),  # the whole command
    "train_images_per_second": train.get("images_per_second"),
    "val_accuracy": ev.get("accuracy"),
    "val_accuracy_tta": tta.get("accuracy"),
}
metrics = out / "metrics.jsonl"
if metrics.exists():
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary["train_60_epochs_seconds"] = round(sum(r.get("epoch_seconds", 0) for r in rows), 1)
print(json.dumps(summary, indent=2))
EOF
exit $status
