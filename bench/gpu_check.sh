#!/bin/bash
# One GPU check, on one H100 / H200 (or any CUDA GPU; FP8 cases are refused below compute capability 9.0):
#   bash bench/gpu_check.sh [--out FILE.json] [--fast]
# Records the card (nvidia-smi), then bench/gpu_check.py: token_stats on CUDA vs float64 (values and
# gradient), Qwen3 tiny and 0.6B-shaped models with Transformer Engine in bf16 and FP8 (forward + backward,
# tokens/s, peak memory), the optimizer, an async torch_dist checkpoint save of the 0.6B shape (snapshot,
# loop-visible time; ~17 GB in $TMPDIR), the vllm engine with sleep mode (when vllm is installed). Ends in a
# few minutes; a hard limit of 9 minutes stops it well inside 10. With two GPUs (and vllm) it then runs
# bench/gpu_check_vllm_tp.py under torchrun (vLLM TP=2; up to 5 more minutes).
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
rc=0
timeout --signal=TERM --kill-after=15 540 "$PY" bench/gpu_check.py --out "$OUT" "${args[@]}" || rc=$?
# vLLM tensor parallelism (rollout.vllm_tp=2, external_launcher under torchrun): only with two GPUs visible
# and vllm installed; its own time limit (a second run of the script, not part of the 9 minutes above).
ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [[ "$ngpu" -ge 2 ]] && "$PY" -c "import vllm" 2>/dev/null; then
    echo "== vLLM TP=2 check (bench/gpu_check_vllm_tp.py)"
    timeout --signal=TERM --kill-after=15 300 "$PY" -m torch.distributed.run --nproc-per-node=2 \
        bench/gpu_check_vllm_tp.py --out "${OUT%.json}_vllm_tp.json" || rc=1
else
    echo "== vLLM TP=2 check skipped (needs 2 GPUs and vllm; GPUs visible: $ngpu)"
fi
exit $rc
