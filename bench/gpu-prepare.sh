#!/usr/bin/env bash
# Prepares a run of bench/gpu-check.sh on a lent GPU machine (the device tool), from a developer's checkout:
# the wheels that machine lacks (platformdirs, truststore: pure Python) in .whl/, and the 16 MB JPEG CIFAR-10
# archive in .devdata/ (both git-ignored, both carried). Prints the command to give the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${1:-../shared/datasets/cifar10-jpeg-train.tar.gz}
mkdir -p .whl .devdata
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "platformdirs>=3" "truststore>=0.8"
cp "$archive" .devdata/cifar10-jpeg-train.tar.gz
cat <<'EOF'
Ready. On the device tool, with carry [".whl", ".devdata"] and timeout_s 590:

python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src && bench/gpu-check.sh $OUT/gpu .devdata/cifar10-jpeg-train.tar.gz

Then copy the figures of $OUT/gpu/summary.json (and bench.json) into bench/RESULTS.md, with the device named.
EOF
