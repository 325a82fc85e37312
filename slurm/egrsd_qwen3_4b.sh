#!/bin/bash
# CL-EGRSD training of Qwen3-4B on 2 nodes x 8 H100 (conf/qwen3_4b.yaml: TP=4, DP=4).
#   sbatch slurm/egrsd_qwen3_4b.sh [section.key=value ...]      (from the repository root)
# Before the first run: `egrsd plan conf/qwen3_4b.yaml --nodes 2` and `sbatch slurm/convert_hf_to_megatron.sh`.
# Preemption / time limit: the trainer gets SIGUSR1 120 s before the end, saves and exits 42; the launcher
# requeues the job, which resumes from the last checkpoint in EGRSD_RUN_DIR (train.resume=auto).
#SBATCH --job-name=egrsd-qwen3-4b
##SBATCH --account=my_account          # <- your account (remove one '#')
##SBATCH --partition=gpu               # <- your partition (remove one '#')
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# ============ settings: edit here, or export them before sbatch (the environment wins) ============
: "${EGRSD_REPO:=$SLURM_SUBMIT_DIR}"                     # this repository, on a shared filesystem
: "${EGRSD_CONFIG:=conf/qwen3_4b.yaml}"                  # experiment config (relative to EGRSD_REPO)
: "${EGRSD_RUN_DIR:=/scratch/$USER/egrsd/qwen3_4b}"      # checkpoints/, metrics.jsonl, tb/, logs/
: "${EGRSD_HF_MODEL:=/models/Qwen3-4B}"                  # Hugging Face folder (tokenizer, config.json)
: "${EGRSD_MEGATRON_CKPT:=/scratch/$USER/egrsd/qwen3_4b_megatron_tp4}"  # from convert_hf_to_megatron.sh
: "${EGRSD_DATA:=/data/egrsd/train.jsonl}"               # training problems (problem, solution, answer)
: "${EGRSD_RUNTIME:=container}"                          # container (pyxis) | venv (bare metal)
: "${EGRSD_IMAGE:=nvcr.io/nvidia/pytorch:25.04-py3}"     # an image with this repo's dependencies installed
: "${EGRSD_MOUNTS:=/models:/models,/data:/data,/scratch:/scratch}"
: "${EGRSD_VENV:=$EGRSD_REPO/.venv}"                     # runtime=venv only
# ===================================================================================================
set -euo pipefail
source "$EGRSD_REPO/slurm/launcher.sh"
egrsd_setup
egrsd_launch train "$EGRSD_CONFIG" train.out_dir="$EGRSD_RUN_DIR" train.resume=auto \
    model.hf_path="$EGRSD_HF_MODEL" model.init_from=megatron model.load="$EGRSD_MEGATRON_CKPT" \
    data.train_path="$EGRSD_DATA" "$@"
