#!/usr/bin/env bash
# Here, before a GPU device run: fills device-data/ (git-ignored, ~56 MB, under the
# device tool's 64 MiB) with what the GPU machine lacks: the Keras wheels of
# requirements.lock for its Python 3.12 (it has JAX and PyTorch, not TensorFlow or Keras)
# and the msoud images of the mirror. Then run bench/device_paper.sh there with
# carry ["device-data"].
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR=${BRAINTUMOR_MIRROR:-../shared/datasets}
pin() { grep -E "^$1==" requirements.lock; }
rm -rf device-data
mkdir -p device-data/wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d device-data/wheels "$(pin keras)" "$(pin namex)" "$(pin optree)"
cp -r "$MIRROR/msoud" device-data/msoud
du -sb device-data | awk '{printf "device-data: %.1f MB\n", $1 / 1e6}'
