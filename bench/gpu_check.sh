#!/usr/bin/env bash
# The GPU checks of issue 14 in one command, on a machine with a CUDA device (about 5-8 minutes):
#   1. the tests marked `gpu` (every stage on CUDA per adapter kind x dtype; GPU-trained artifacts on the CPU);
#   2. the default chain through the real CLI with backbone.device=cuda;
#   3. the PPO layout benchmark on the GPU (peak GPU memory and seconds per update, ours / separate copies).
# Usage: bench/gpu_check.sh [PYTHON]   (default: .venv/bin/python, else python3). Logs go to $OUT or /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v "${1:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}")
LOGS=${OUT:-/tmp}/gpu_check
mkdir -p "$LOGS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RLHF_HOME=${RLHF_HOME:-$PWD/.rlhf} WANDB_MODE=offline HF_HUB_OFFLINE=1

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device is visible: nothing to check")'
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

echo "== 1. pytest -m gpu"
SECONDS=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$LOGS/pytest.log"
echo "   (${SECONDS}s)"

echo "== 2. the default chain on CUDA"
SECONDS=0
RUNS=$(mktemp -d)
(cd "$RUNS" && "$PY" -m flows.cli run --run-id gpu --set backbone.device=cuda --set tracking.backend=none) \
  2>&1 | tee "$LOGS/chain.log"
echo "   (${SECONDS}s)"

echo "== 3. PPO: one backbone vs separate copies, on the GPU"
SECONDS=0
"$PY" bench/ppo_memory.py --device cuda --sizes 31m,105m --updates 3 2>&1 | tee "$LOGS/ppo_bench.log"
echo "   (${SECONDS}s)"
