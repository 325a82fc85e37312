#!/bin/bash
# Evaluate a model (Hugging Face folder or Megatron/training checkpoint): avg@k, pass@k, lengths.
#   sbatch slurm/eval.sh [extra `egrsd eval` flags]      (from the repository root)
# The evaluation is resumable: a preempted or requeued job continues where it stopped (same --out).
#SBATCH --job-name=egrsd-eval
##SBATCH --account=my_account          # <- your account (remove one '#')
##SBATCH --partition=gpu               # <- your partition (remove one '#')
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# ============ settings: edit here, or export them before sbatch (the environment wins) ============
: "${EGRSD_REPO:=$SLURM_SUBMIT_DIR}"                     # this repository, on a shared filesystem
: "${EGRSD_EVAL_MODEL:=/scratch/$USER/egrsd/qwen3_8b/checkpoints/latest}"  # HF folder or checkpoint
: "${EGRSD_BENCHMARKS:=math500 aime24}"                  # DATA_DIR/NAME.jsonl each
: "${EGRSD_EVAL_DATA:=/data/egrsd/eval}"
: "${EGRSD_EVAL_K:=8}"
: "${EGRSD_TOKENIZER:=/models/Qwen3-8B}"
: "${EGRSD_RUN_DIR:=/scratch/$USER/egrsd/eval/qwen3_8b}" # results (resumable) and logs/
: "${EGRSD_RUNTIME:=container}"                          # container (pyxis) | venv (bare metal)
: "${EGRSD_IMAGE:=nvcr.io/nvidia/pytorch:25.04-py3}"
: "${EGRSD_MOUNTS:=/models:/models,/data:/data,/scratch:/scratch}"
: "${EGRSD_VENV:=$EGRSD_REPO/.venv}"
# ===================================================================================================
set -euo pipefail
source "$EGRSD_REPO/slurm/launcher.sh"
egrsd_setup
model="$EGRSD_EVAL_MODEL"
# `checkpoints/latest` is a text file naming the newest complete step folder.
if [[ -f "$model" ]]; then model="$(dirname "$model")/$(cat "$model")"; fi
# shellcheck disable=SC2086  # EGRSD_BENCHMARKS is a space-separated list on purpose
egrsd_launch egrsd eval --model "$model" --benchmarks $EGRSD_BENCHMARKS --data-dir "$EGRSD_EVAL_DATA" \
    --k "$EGRSD_EVAL_K" --tokenizer "$EGRSD_TOKENIZER" --out "$EGRSD_RUN_DIR/results" --no-progress "$@"
