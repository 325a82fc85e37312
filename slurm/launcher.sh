# shellcheck shell=bash
# The one launcher every sbatch script in slurm/ sources (never run it directly).
#
#   source "$EGRSD_REPO/slurm/launcher.sh"
#   egrsd_setup                                  # environment, folders, master address, srun arguments
#   egrsd_launch train "$EGRSD_CONFIG" key=value  # srun one task per GPU (or CPU slot); handle preemption
#
# Settings it reads (the sbatch scripts set them in their settings block; the environment may override):
#   EGRSD_REPO      this repository, on a filesystem every node sees (default: the submit folder)
#   EGRSD_RUN_DIR   train.out_dir: checkpoints/, metrics.jsonl, tb/, and logs/ (launcher events)
#   EGRSD_RUNTIME   container (NVIDIA image through pyxis/enroot) | venv (bare metal)
#   EGRSD_IMAGE     container image (a registry name, or an .sqsh file made with `enroot import`)
#   EGRSD_MOUNTS    container mounts, src:dst[,src:dst...] (the repo, data, models and run folders)
#   EGRSD_VENV      virtual environment for runtime=venv (default $EGRSD_REPO/.venv)
#   EGRSD_MAX_RESTARTS  give up requeueing after this many restarts (default 50)
#   EGRSD_SRUN_EXTRA    extra srun flags for this site, space-separated (e.g. "--mpi=pmix")
#
# Preemption contract with the trainer (egrsd_megatron.trainer): on SIGUSR1 or SIGTERM every rank finishes
# its current step, the checkpoint is saved (`latest` written last) and every rank exits with code 42.
# Then this launcher runs `scontrol requeue $SLURM_JOB_ID`; the requeued job starts again with
# train.resume=auto and continues from `latest`. Any other non-zero exit is a failure: no requeue.
# Signals reach the trainer either directly (`#SBATCH --signal=USR1@120` and `scancel --signal=USR1 JOB`
# signal the srun steps) or through this shell (`--signal=B:USR1@..`, `scancel --batch`), whose trap
# forwards them to srun, which forwards them to every task.

EGRSD_PREEMPT_EXIT=42

egrsd_log() {
    local line
    line="[egrsd-launcher $(date -u +%Y-%m-%dT%H:%M:%SZ) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"
    echo "$line" >&2
    if [[ -n "${EGRSD_RUN_DIR:-}" && -d "$EGRSD_RUN_DIR/logs" ]]; then
        echo "$line" >> "$EGRSD_RUN_DIR/logs/launcher.log"
    fi
}

egrsd_die() {
    egrsd_log "ERROR: $*"
    exit 2
}

egrsd_setup() {
    [[ -n "${SLURM_JOB_ID:-}" ]] || egrsd_die "not inside a Slurm job: submit with sbatch (SLURM_JOB_ID is unset)"
    : "${EGRSD_REPO:=${SLURM_SUBMIT_DIR:-$PWD}}"
    : "${EGRSD_RUNTIME:=venv}"
    : "${EGRSD_VENV:=$EGRSD_REPO/.venv}"
    : "${EGRSD_MAX_RESTARTS:=50}"
    [[ -f "$EGRSD_REPO/setup.py" && -d "$EGRSD_REPO/egrsd_megatron" ]] ||
        egrsd_die "EGRSD_REPO=$EGRSD_REPO is not the egrsd-megatron repository: submit from the repo root or set EGRSD_REPO"
    [[ -n "${EGRSD_RUN_DIR:-}" ]] || egrsd_die "EGRSD_RUN_DIR is unset: set it in the settings block of the sbatch script"
    mkdir -p "$EGRSD_RUN_DIR/logs" || egrsd_die "cannot create $EGRSD_RUN_DIR/logs"

    # Rendezvous for torch.distributed: the first node of the job; a port derived from the job id so two
    # jobs sharing a node do not collide (the runtime computes the same values when these are unset).
    # (sed, not head: head exits early and, with pipefail, a SIGPIPE'd scontrol would fail the script)
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
    export MASTER_ADDR
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

    # Megatron-Core: one CUDA work queue per device keeps TP communication kernels ordered before the
    # compute that consumes them (needed for its comm/compute overlap).
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # A rank that dies or hangs aborts the collective (and the job) instead of deadlocking the others.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # InfiniBand: tolerate fabric hiccups on long jobs (timeout = 4.096 us * 2^22, about 17 s).
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
    export TORCH_NCCL_AVOID_RECORD_STREAMS=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    export TOKENIZERS_PARALLELISM=false
    # The package is used from the repository itself: no install step inside the container.
    export PYTHONPATH="$EGRSD_REPO${PYTHONPATH:+:$PYTHONPATH}"

    # --kill-on-bad-exit: one crashed rank ends the step instead of leaving the others hung in a collective.
    EGRSD_SRUN_ARGS=(--kill-on-bad-exit=1 --label)
    # Slurm 22.05 stopped passing sbatch's --cpus-per-task to srun (23.11 restored it): pass it explicitly.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        EGRSD_SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    # Site-specific srun flags (e.g. "--mpi=pmix --cpu-bind=none"), space-separated.
    if [[ -n "${EGRSD_SRUN_EXTRA:-}" ]]; then
        read -r -a _extra <<< "$EGRSD_SRUN_EXTRA"
        EGRSD_SRUN_ARGS+=("${_extra[@]}")
    fi
    case "$EGRSD_RUNTIME" in
        container)
            [[ -n "${EGRSD_IMAGE:-}" ]] || egrsd_die "EGRSD_RUNTIME=container needs EGRSD_IMAGE"
            local mounts="$EGRSD_REPO:$EGRSD_REPO,$EGRSD_RUN_DIR:$EGRSD_RUN_DIR${EGRSD_MOUNTS:+,$EGRSD_MOUNTS}"
            EGRSD_SRUN_ARGS+=(--container-image="$EGRSD_IMAGE" --container-mounts="$mounts"
                              --container-workdir="$EGRSD_REPO" --no-container-mount-home)
            EGRSD_PYTHON=python
            ;;
        venv)
            [[ -x "$EGRSD_VENV/bin/python" ]] ||
                egrsd_die "EGRSD_RUNTIME=venv but $EGRSD_VENV/bin/python does not exist: run \`make setup\` or set EGRSD_VENV"
            EGRSD_SRUN_ARGS+=(--chdir="$EGRSD_REPO")
            EGRSD_PYTHON="$EGRSD_VENV/bin/python"
            ;;
        *) egrsd_die "EGRSD_RUNTIME=$EGRSD_RUNTIME: expected container or venv" ;;
    esac
    export EGRSD_PYTHON
    egrsd_log "setup: ${SLURM_JOB_NUM_NODES:-1} node(s) [$SLURM_JOB_NODELIST], ${SLURM_NTASKS:-1} task(s), runtime=$EGRSD_RUNTIME, run dir $EGRSD_RUN_DIR, master $MASTER_ADDR:$MASTER_PORT"
}

_egrsd_forward() {
    # Forward a signal the batch shell received to srun, which forwards it to every task.
    local sig=$1
    egrsd_log "batch shell got SIG$sig: forwarding to the training step"
    if [[ -n "${EGRSD_SRUN_PID:-}" ]]; then
        kill -s "$sig" "$EGRSD_SRUN_PID" 2>/dev/null || true
    fi
}

# egrsd_launch PROGRAM [ARGS...]: run PROGRAM on every task with srun and handle its exit.
#   `train` runs recipes/train.py, `egrsd` the egrsd command line (python -m egrsd_megatron.cli), both with
#   the runtime's python; anything else runs as given.
egrsd_launch() {
    local prog=$1
    shift
    local cmd
    case "$prog" in
        train) cmd=("$EGRSD_PYTHON" recipes/train.py "$@") ;;
        egrsd) cmd=("$EGRSD_PYTHON" -m egrsd_megatron.cli "$@") ;;
        *) cmd=("$prog" "$@") ;;
    esac
    local restarts="${SLURM_RESTART_COUNT:-0}"
    if ((restarts > EGRSD_MAX_RESTARTS)); then
        egrsd_die "restarted $restarts times (> EGRSD_MAX_RESTARTS=$EGRSD_MAX_RESTARTS): giving up"
    fi
    egrsd_log "launch: ${cmd[*]}"

    # A bash trap runs only once the foreground command returns, so srun runs in the background and
    # we `wait` for it: a signal interrupts `wait`, the trap forwards it, and we wait again.
    trap '_egrsd_forward USR1' USR1
    trap '_egrsd_forward TERM' TERM
    srun "${EGRSD_SRUN_ARGS[@]}" "${cmd[@]}" &
    EGRSD_SRUN_PID=$!
    local rc=0
    wait "$EGRSD_SRUN_PID" || rc=$?
    while kill -0 "$EGRSD_SRUN_PID" 2>/dev/null; do
        rc=0
        wait "$EGRSD_SRUN_PID" || rc=$?
    done
    trap - USR1 TERM
    EGRSD_SRUN_PID=

    if ((rc == 0)); then
        egrsd_log "finished (exit 0)"
        return 0
    fi
    if ((rc == EGRSD_PREEMPT_EXIT)); then
        # The checkpoint is already saved: requeue kills this job at once (SIGTERM) and queues it again.
        egrsd_log "preempted: checkpoint saved (exit $rc); requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            # Normally not reached: requeue terminates this shell. Wait for it rather than exit, so the job
            # is not recorded as COMPLETED before Slurm requeues it.
            sleep 300
            exit "$rc"
        fi
        egrsd_log "ERROR: scontrol requeue failed (was the job submitted with --no-requeue?): resubmit it; it resumes from the last checkpoint"
        exit "$rc"
    fi
    egrsd_log "FAILED: exit code $rc (not a preemption exit: no requeue); see the task output above"
    exit "$rc"
}
