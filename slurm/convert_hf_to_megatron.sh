#!/bin/bash
# Hugging Face Qwen3 folder -> Megatron checkpoint sharded for the training layout (one process, CPU work).
#   sbatch slurm/convert_hf_to_megatron.sh              (from the repository root)
# Write it with the TP / PP of the training config (conf/qwen3_8b.yaml: TP=8, PP=1). Reconverting to
# another layout: `egrsd convert megatron-to-hf` then this again.
#SBATCH --job-name=egrsd-convert
##SBATCH --account=my_account          # <- your account (remove one '#')
##SBATCH --partition=cpu               # <- a partition with big-memory nodes (remove one '#')
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# ============ settings: edit here, or export them before sbatch (the environment wins) ============
: "${EGRSD_REPO:=$SLURM_SUBMIT_DIR}"                     # this repository, on a shared filesystem
: "${EGRSD_HF_MODEL:=/models/Qwen3-8B}"                  # Hugging Face folder (config.json + safetensors)
: "${EGRSD_MEGATRON_CKPT:=/scratch/$USER/egrsd/qwen3_8b_megatron_tp8}"  # output folder
: "${EGRSD_TP:=8}"                                       # tensor parallel size to write
: "${EGRSD_PP:=1}"                                       # pipeline parallel size to write
: "${EGRSD_RUN_DIR:=/scratch/$USER/egrsd/convert}"       # launcher logs
: "${EGRSD_RUNTIME:=container}"                          # container (pyxis) | venv (bare metal)
: "${EGRSD_IMAGE:=nvcr.io/nvidia/pytorch:25.04-py3}"
: "${EGRSD_MOUNTS:=/models:/models,/scratch:/scratch}"
: "${EGRSD_VENV:=$EGRSD_REPO/.venv}"
# ===================================================================================================
set -euo pipefail
source "$EGRSD_REPO/slurm/launcher.sh"
egrsd_setup
# The converter writes through a temporary folder renamed at the end: a requeued job starts it over cleanly.
egrsd_launch egrsd convert hf-to-megatron --hf "$EGRSD_HF_MODEL" --out "$EGRSD_MEGATRON_CKPT" \
    --tp "$EGRSD_TP" --pp "$EGRSD_PP" "$@"
