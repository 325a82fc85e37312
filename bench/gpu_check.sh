#!/bin/bash
# One GPU check, on one H100 / H200 (or any CUDA GPU; FP8 cases are refused below compute capability 9.0):
#   bash bench/gpu_check.sh [--out FILE.json] [--fast]
# Records the card (nvidia-smi), then bench/gpu_check.py: token_stats on CUDA vs float64 (values and
# gradient), Qwen3 tiny and 0.6B-shaped models with Transformer Engine in bf16 and FP8 (forward + backward,
# tokens/s, peak memory). Ends in a few minutes; a hard limit of 9 minutes stops it well inside 10.
# Run it inside the training image (it needs torch with CUDA, megatron-core and transformer-engine), e.g.
#   srun -N1 -n1 --gpus=1 --container-image="$EGRSD_IMAGE" --container-mounts="$PWD:$PWD" \
#        --container-workdir="$PWD" bash bench/gpu_check.sh --out gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}"
OUT="gpu_check.json"
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
export CUDA_DEVICE_MAX_CONNECTIONS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29517}"
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || echo "(nvidia-smi unavailable)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
timeout --signal=TERM --kill-after=15 540 "$PY" bench/gpu_check.py --out "$OUT" "${args[@]}"
