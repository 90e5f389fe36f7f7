#!/usr/bin/env bash
# The GPU fast-path benchmark (issue #15) as one prepared call: eager vs compiled per stage and per
# video, cold vs warm replica start, FP8 speed and quality, low-VRAM peaks, written to
# $OUT/fastpath.json section by section (a run cut short keeps every finished figure).
#
# The GPU machine has torch, transformers, numpy and PIL but no diffusers or pydantic and no
# package registry, so the wheels travel with the working tree in the git-ignored .whl/ folder:
#   bash benchmarks/gpu_fastpath.sh --download        # here, once (needs PyPI)
# then, through the device tool (carry [".whl"], timeout_s 540):
#   bash benchmarks/gpu_fastpath.sh                   # ~7-8 min on an H100/H200 (budget 450 s + start)
# Extra arguments go to bench_pipeline.py; a CPU check of the script's logic:
#   PYTHON=.venv/bin/python SKIP_INSTALL=1 bash benchmarks/gpu_fastpath.sh --tiny --frames 4 --steps 2 \
#       --decode-chunk-size 4 --budget-s 3000
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
WHEEL_PINS=(diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5
            annotated-types==0.8.0 importlib-metadata==10.2.0 typing-extensions==4.16.0)
if [[ ${1:-} == --download ]]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "${WHEEL_PINS[@]}"
fi
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/gpu-fastpath}
mkdir -p "$OUT"
if [[ -z ${SKIP_INSTALL:-} ]]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_fastpath.sh: no wheels in $WHEELS (run with --download first)" >&2; exit 2; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
# aot: the cold start exports and compiles packages, the warm start (a fresh process) loads them.
# Sections run in order (eager, low_vram, compiled, warm_start, fp8); one that would end after the
# budget is skipped and recorded as skipped.
"$PYTHON" benchmarks/bench_pipeline.py --fastpath --compile-engine aot --compile-vae --fp8 --low-vram \
  --decode-chunk-size 25 --budget-s "${BUDGET_S:-450}" --warm-timeout-s 180 --work-dir /tmp/fastpath-work \
  --json "$OUT/fastpath.json" "$@" 2>&1 | tee "$OUT/fastpath.log"
