#!/usr/bin/env bash
# On a GPU device machine (after bench/device_prep.sh here, carry ["device-data"]):
#   1. the paper recipe (profile paper-jax: JAX, msoud, 30 + 20 epochs), every stage,
#      with this repo's compile settings (full batches, persistent compilation cache);
#   2. "before": 2 + 2 epochs with the settings before them (ragged last batch, no cache);
#   3. "warm": 2 + 2 epochs again with the cache that run 1 filled.
# Each step has its own time limit so one slow step cannot eat the others; results go to
# $OUT (summary.json per run, the GPU's name, and the logs and metrics as one archive).
#   PY=.venv/bin/python SKIP_WHEELS=1 EXTRA="--set common.image_size=32 ..." \
#     bench/device_paper.sh            # the same steps on a CPU, shrunk, to check the script
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/out/device}
WORK=${WORK:-/tmp/paper-run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -z "${SKIP_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site device-data/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  KERAS_BACKEND=jax "$PY" -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
# shellcheck disable=SC2086  # EXTRA holds several --set arguments
timeout "${PAPER_LIMIT:-330}" "$PY" bench/paper_run.py --profile paper-jax --mirror device-data \
  --work "$WORK" --out "$OUT/paper" ${EXTRA:-}
SHORT=(--stages train,finetune --set train.frozen.epochs=2 --set train.finetune.epochs=2)
# shellcheck disable=SC2086
timeout "${SHORT_LIMIT:-110}" "$PY" bench/paper_run.py --profile paper-jax --work "$WORK" \
  ${EXTRA:-} "${SHORT[@]}" --set train.drop_remainder=false --set train.compilation_cache=null \
  --out "$OUT/before"
# shellcheck disable=SC2086
timeout "${SHORT_LIMIT:-110}" "$PY" bench/paper_run.py --profile paper-jax --work "$WORK" \
  ${EXTRA:-} "${SHORT[@]}" --out "$OUT/warm"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs metrics 2>/dev/null
ls -la "$OUT" "$OUT"/*
