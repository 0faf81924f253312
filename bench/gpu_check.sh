#!/usr/bin/env bash
# The GPU checks in one command, on a machine with a CUDA device:
#   1. the tests marked `gpu` (every stage on CUDA per adapter kind x dtype; GPU-trained artifacts on the CPU);
#   2. the default chain through the real CLI with backbone.device=cuda (needs Prefect; skipped without it);
#   3. the PPO layout benchmark on the GPU (peak GPU memory and seconds per update, ours / separate copies);
#   4. our PPO against TRL 1.11's PPOTrainer on the GPU (bench/ppo_vs_trl.py; TRL_PYTHON: a Python with trl 1.11);
#   5. the chain [sft, reward, rrhf, ppo, dpo, grpo] at Qwen2.5-0.5B's shape (random weights, the real Qwen2.5
#      tokenizer and chat template), bf16 on CUDA: seconds and peak GPU memory per stage, generation tokens/s
#      (bench/shape_chain.py; through the CLI where Prefect is installed, else the stage processes in order;
#      CHAIN_LAUNCHER=processes: those even where Prefect is; QWEN_TOKENIZER: a qwen2.5-instruct folder of
#      tests/families.py, where that cannot be built);
#   6. our GRPO against TRL 1.16's GRPOTrainer at that shape (bench/grpo_vs_trl.py --sizes 0.5b);
#   7. every stage's matmul FLOPs per second against the GPU's measured bf16 peak, on a random Llama with
#      Qwen2.5-0.5B's decoder (24 x 896, MLP 4864) and the built-in tokenizer (bench/utilisation.py).
# Usage: [STEPS="4 3 1"] [TRL_PYTHON=...] [QWEN_TOKENIZER=...] bench/gpu_check.sh [PYTHON]
#        (PYTHON default: .venv/bin/python, else python3). Steps run in the order above.
#        DRY_RUN=1 bench/gpu_check.sh: steps 5, 6 and 7 on the CPU at a tiny shape (float32), no CUDA needed:
#        the script's own check, about 4 minutes on 2 cores.
# Every chosen step runs even when an earlier one fails; the exit status says whether all passed.
# Logs go to $OUT/gpu_check, or /tmp/gpu_check (step 5's figures also as step5.json).
#
# A lent device with 15 minutes, machine start (2-3 min) included: STEPS="5 6 7" first (about 4.5 + 2 + 1.5 min),
# then STEPS=1 (about 1.5 min) if the time is left; 2 and 3 are a few minutes each, 4 needs a network to make
# TRL 1.11's virtual environment. Estimates from the H200 run of 2026-12-01 (step 1: 69 s); see bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v "${1:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}")
LOGS=${OUT:-/tmp}/gpu_check
mkdir -p "$LOGS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RLHF_HOME=${RLHF_HOME:-$PWD/.rlhf} WANDB_MODE=offline HF_HUB_OFFLINE=1

DRY_RUN=${DRY_RUN:-}
if [ -n "$DRY_RUN" ]; then
  DEVICE=cpu SHAPE=tiny GRPO_SIZE=1.6m DEFAULT_STEPS="5 6 7"
  UTILISATION_SHAPE="--layers 2 --hidden 128 --intermediate 384 --heads 4"
  "$PY" -c 'from stages.io.devices import cpu_model; import torch; print("dry run on the CPU:", cpu_model(), "| torch", torch.__version__)'
else
  DEVICE=cuda SHAPE=0.5b GRPO_SIZE=0.5b DEFAULT_STEPS="1 2 3 4 5 6 7"
  UTILISATION_SHAPE="--layers 24 --hidden 896 --intermediate 4864 --heads 14"  # Qwen2.5-0.5B's decoder
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device is visible: nothing to check")' || exit 1
  "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
fi

failed=()
step() {  # step NUMBER TITLE COMMAND...: run one check, log it, remember a failure
  local number=$1 title=$2
  shift 2
  [[ " ${STEPS:-$DEFAULT_STEPS} " == *" $number "* ]] || return 0
  echo "== $number. $title"
  if [ -n "$DRY_RUN" ] && [ "$number" -lt 5 ]; then
    echo "   (step $number: skipped, DRY_RUN: it needs a CUDA device)"
    return 0
  fi
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
step 5 "the chain at the $SHAPE shape on $DEVICE: seconds, peak memory, generation tokens/s" \
  "$PY" bench/shape_chain.py --shape "$SHAPE" --device "$DEVICE" --json "$LOGS/step5.json" \
  --launcher "${CHAIN_LAUNCHER:-auto}" ${QWEN_TOKENIZER:+--tokenizer "$QWEN_TOKENIZER"}
step 6 "GRPO: ours vs TRL 1.16's GRPOTrainer at $GRPO_SIZE on $DEVICE" \
  "$PY" bench/grpo_vs_trl.py --device "$DEVICE" --sizes "$GRPO_SIZE" --steps 2 --repeats 1
step 7 "every stage's matmul FLOPs against the measured peak, on $DEVICE" \
  "$PY" bench/utilisation.py --device "$DEVICE" $UTILISATION_SHAPE

[ ${#failed[@]} -eq 0 ] || { echo "failed steps: ${failed[*]}"; exit 1; }
echo "all chosen steps passed"
