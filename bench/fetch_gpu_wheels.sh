#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels bench/gpu_run.sh installs on the GPU machine,
# into .whl/ (git-ignored; carried to the device, never committed).
#
# The GPU image (python 3.12, torch, accelerate, pandas, pyarrow, huggingface-hub, tokenizers 0.23.x,
# transformers 5.17; see the device notes' package list) lacks TRL, datasets, dill and multiprocess.
# transformers and tokenizers travel too, at the versions the CPU test suite runs, so the GPU run
# exercises the same TRL / transformers code as CI (transformers 5.10.4 refuses, at import, tokenizers
# newer than 0.23.0 and regex older than 2025.10.22: regex travels in case the image's is older). Total about 17 MB; `bash bench/gpu_run.sh` prints the versions it runs with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  trl==1.16.0 transformers==5.10.4 tokenizers==0.22.2 regex==2026.11.19 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -la .whl && du -sh .whl
