#!/usr/bin/env bash
# Prepares bench/gpu-check.sh for a GPU machine, also an offline one, from a checkout on a machine with pip's
# network: the pure-Python wheels cifarnet and the check need in .whl/ (gpu-check.sh installs those whose
# package the GPU machine lacks; torch, torchvision, numpy and pillow must be there already) and the 16 MB JPEG
# CIFAR-10 archive in .devdata/. Both folders are git-ignored. Then copy the checkout, with them, over, and run
# the command printed at the end there.
#
#   bench/gpu-prepare.sh [ARCHIVE]      (default ../shared/datasets/cifar10-jpeg-train.tar.gz)
#
# GPU_PYTHON=3.12 is the GPU machine's Python version (the wheels are pure Python; their dependencies are
# resolved for that version).
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${1:-../shared/datasets/cifar10-jpeg-train.tar.gz}
python_version=${GPU_PYTHON:-3.12}
# cifarnet's own dependencies that are pure Python and pytest for the CUDA tests, with everything they need on
# that Python (pip resolves it: typer, for one, needs annotated-doc).
rm -rf .whl
mkdir -p .whl .devdata
python3 -m pip download -q --only-binary=:all: --python-version "$python_version" --implementation py -d .whl \
  platformdirs truststore certifi typer rich pytest
cp "$archive" .devdata/cifar10-jpeg-train.tar.gz
echo "Wheels in .whl/: $(ls .whl | tr '\n' ' ')"
cat <<'EOF'
Ready. On the GPU machine, in this checkout (with .whl/ and .devdata/), about 9 minutes at most:

bench/gpu-check.sh OUT .devdata/cifar10-jpeg-train.tar.gz

OUT receives summary.json, check.log, tests.xml, bench.json, train.json and evaluate.json; copy the figures of
summary.json (and bench.json) into bench/RESULTS.md, with the machine named.
EOF
