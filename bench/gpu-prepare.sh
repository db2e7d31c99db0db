#!/usr/bin/env bash
# Prepares bench/gpu-check.sh for a GPU machine, also an offline one, from a checkout on a machine with pip's
# network: the pure-Python wheels cifarnet and the check need in .whl/ (gpu-check.sh installs those whose
# package the GPU machine lacks; torch, torchvision, numpy and pillow must be there already) and the training
# data in .devdata/. Both folders are git-ignored. Then copy the checkout, with them, over, and run the command
# printed at the end there.
#
#   bench/gpu-prepare.sh [DATA]
#
# DATA: a copy of the data to take along (cifar10-jpeg-train.tar.gz, the CIFAR-10 training split as JPEGs in
# class folders, 16 MB; an image folder; or a cifar-10-batches-py folder). Without it, CIFAR-10 is downloaded
# (170 MB, verified by SHA-256) with `cifarnet download cifar10` into .devdata/cifar10/.
#
# GPU_PYTHON=3.12 is the GPU machine's Python version (the wheels are pure Python; their dependencies are
# resolved for that version).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ge 1 ] && [ ! -e "$1" ]; then
  echo "gpu-prepare.sh: $1 does not exist; give the data to take along, or nothing to download CIFAR-10" >&2
  exit 2
fi
python_version=${GPU_PYTHON:-3.12}
# cifarnet's own dependencies that are pure Python and pytest for the CUDA tests, with everything they need on
# that Python (pip resolves it: typer, for one, needs annotated-doc).
rm -rf .whl
mkdir -p .whl .devdata
python3 -m pip download -q --only-binary=:all: --python-version "$python_version" --implementation py -d .whl \
  platformdirs truststore certifi typer rich pytest
if [ $# -ge 1 ]; then
  data=.devdata/$(basename "$1")
  rm -rf "$data"
  cp -r "$1" "$data"
else
  data=.devdata/cifar10
  if command -v cifarnet >/dev/null; then
    cifarnet download cifar10 --data-dir "$data"
  else
    PYTHONPATH=src python3 -m cifarnet_cli download cifar10 --data-dir "$data"
  fi
fi
echo "Wheels in .whl/: $(ls .whl | tr '\n' ' ')"
cat <<EOF
Ready. On the GPU machine, in this checkout (with .whl/ and .devdata/), about 9 minutes at most:

bench/gpu-check.sh OUT $data

OUT receives summary.json, check.log, tests.xml, bench.json, train.json and evaluate.json; copy the figures of
summary.json (and bench.json) into bench/RESULTS.md, with the machine named.
EOF
