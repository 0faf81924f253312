#!/usr/bin/env bash
# The GPU checks in one command, on a machine with a CUDA device:
#   1. the tests marked `gpu` (every stage on CUDA per adapter kind x dtype; GPU-trained artifacts on the CPU);
#   2. the default chain through the real CLI with backbone.device=cuda (needs Prefect; skipped without it);
#   3. the PPO layout benchmark on the GPU (peak GPU memory and seconds per update, ours / separate copies);
#   4. our PPO against TRL 1.11's PPOTrainer on the GPU (bench/ppo_vs_trl.py; TRL_PYTHON: a Python with trl 1.11).
# Usage: [STEPS="4 3 1"] [TRL_PYTHON=...] bench/gpu_check.sh [PYTHON]   (default: .venv/bin/python, else python3).
# Every chosen step runs even when an earlier one fails; the exit status says whether all passed.
# Logs go to $OUT/gpu_check, or /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v "${1:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}")
LOGS=${OUT:-/tmp}/gpu_check
mkdir -p "$LOGS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RLHF_HOME=${RLHF_HOME:-$PWD/.rlhf} WANDB_MODE=offline HF_HUB_OFFLINE=1

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device is visible: nothing to check")' || exit 1
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

failed=()
step() {  # step NUMBER TITLE COMMAND...: run one check, log it, remember a failure
  local number=$1 title=$2
  shift 2
  [[ " ${STEPS:-1 2 3 4} " == *" $number "* ]] || return 0
  echo "== $number. $title"
  SECONDS=0
  "$@" 2>&1 | tee "$LOGS/step$number.log"
  local status=${PIPESTATUS[0]}
  echo "   (step $number: exit $status, ${SECONDS}s)"
  [ "$status" -eq 0 ] || failed+=("$number")
}

default_chain() {
  if ! "$PY" -c 'import prefect' 2>/dev/null; then
    echo "skipped: Prefect is not installed for $PY"
    return 0
  fi
  local runs
  runs=$(mktemp -d)
  (cd "$runs" && "$PY" -m flows.cli run --run-id gpu --set backbone.device=cuda --set tracking.backend=none)
}

step 1 "pytest -m gpu" "$PY" -m pytest -v -m gpu -p no:cacheprovider --durations=0 \
  tests/test_gpu.py::test_the_backbone_loads_onto_the_gpu \
  tests/test_gpu.py::test_a_reward_model_trained_on_the_gpu_scores_the_same_on_the_cpu \
  tests/test_gpu.py::test_every_stage_runs_on_cuda
step 2 "the default chain on CUDA" default_chain
step 3 "PPO: one backbone vs separate copies, on the GPU" \
  "$PY" bench/ppo_memory.py --device cuda --sizes 31m,105m --updates 3
step 4 "PPO: ours vs TRL 1.11's PPOTrainer, on the GPU" \
  "$PY" bench/ppo_vs_trl.py --device cuda --updates 5 ${TRL_PYTHON:+--trl-python "$TRL_PYTHON"}

[ ${#failed[@]} -eq 0 ] || { echo "failed steps: ${failed[*]}"; exit 1; }
echo "all chosen steps passed"
