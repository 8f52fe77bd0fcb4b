#!/usr/bin/env bash
# The single command for the GPU machine (one H200, no network), run from the repository root:
#
#   here:    bash bench/fetch_gpu_wheels.sh            # once: TRL & co. as wheels into .whl/
#   device:  bash bench/gpu_run.sh                     # carry [".whl"], timeout_s 540
#
# Installs the carried wheels into /tmp/site (ahead of the image's packages on PYTHONPATH), then runs
# bench.gpu_step on the Qwen2.5-Math-1.5B and -7B shapes within a 400 s plan and a hard 470 s limit
# (under 8 minutes). Results (gpu_step.json, gpu_step.md, gpu_step.log) go to $OUT when the device
# tool sets it, else bench/results/. The JSON and table are rewritten after every row, so a run cut
# short still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
timeout 470 python3 -m bench.gpu_step --budget-s 400 --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_step.log"
