#!/bin/bash
# A tiny random Qwen3 EGRSD run on CPU through the same launcher as the GPU scripts: the Slurm test
# (tests/integration/test_slurm.py) submits this. `sbatch slurm/egrsd_tiny_cpu.sh [section.key=value ...]`
#SBATCH --job-name=egrsd-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:20:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# ============ settings: edit here, or export them before sbatch (the environment wins) ============
: "${EGRSD_REPO:=$SLURM_SUBMIT_DIR}"            # this repository
: "${EGRSD_CONFIG:=conf/tiny_cpu.yaml}"         # experiment config (relative to EGRSD_REPO)
: "${EGRSD_RUN_DIR:=$EGRSD_REPO/runs/tiny_cpu_slurm}"  # train.out_dir: checkpoints, metrics, logs
: "${EGRSD_RUNTIME:=venv}"                      # venv | container
: "${EGRSD_VENV:=$EGRSD_REPO/.venv}"
# ===================================================================================================
set -euo pipefail
source "$EGRSD_REPO/slurm/launcher.sh"
egrsd_setup
egrsd_launch train "$EGRSD_CONFIG" train.out_dir="$EGRSD_RUN_DIR" train.resume=auto "$@"
