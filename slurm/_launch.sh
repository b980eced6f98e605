#!/usr/bin/env bash
# Shared body of slurm/pretrain.sbatch and slurm/finetune.sbatch (sourced by them, never submitted).
#
# Inputs (set by the sbatch file): ENTRY (launch/pretrain.py | launch/finetune.py), DEFAULT_CONFIG,
# and the job's arguments: [config.yaml] [dotted.key=value ...] [--dry-run] (--dry-run: one process
# prints the job's plan and pre-flight for this allocation's world size, trains nothing).
#
# What it does, on the batch host of the allocation:
#   1. resolves the hosts (scontrol show hostnames), MASTER_ADDR = first host, MASTER_PORT from the
#      job id (the same after a requeue), ranks per node = sbatch --ntasks-per-node, else the GPUs
#      on the node, else 1 (no GPU: DS_ACCELERATOR=cpu, gloo);
#   2. starts ONE srun step with one task per rank; each task exports RANK=SLURM_PROCID,
#      LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS and execs the python entry point, which
#      joins the env:// process group (bf16/ZeRO come from the YAML through dyntrain.train.engine).
#      DeepSpeed's own launchers are not used: its slurm launcher does not read Slurm's rank
#      variables, and a per-node launcher would sit between srun and the training processes and
#      swallow the preemption signal;
#   3. on SIGUSR1 (sbatch --signal=B:USR1@grace) or SIGTERM it sends SIGUSR1 to the srun step; srun
#      forwards it to every task, each trainer saves a checkpoint at the next step boundary and
#      exits 0; the script then requeues the job (scontrol requeue) unless the run already reached
#      run.max_steps. The requeued job (SLURM_RESTART_COUNT > 0) appends checkpoint.resume=auto, so
#      it continues from the newest complete checkpoint and the same MLflow run.
#
# Environment knobs: DYNTRAIN_ROOT (repository; default the submit directory), DYNTRAIN_PYTHON
# (default $DYNTRAIN_ROOT/.venv/bin/python, else python3), DYNTRAIN_RANKS_PER_NODE (overrides
# --ntasks-per-node), DYNTRAIN_MASTER_PORT.
set -uo pipefail

# every line is redacted (URL user-info, secret-looking query values), as dyntrain.redaction does
redact() { sed -E 's%(://)[^/@[:space:]]*@%\1***@%g; s%([?&][^=&[:space:]]*(pass|pwd|secret|token|key|sig|credential|auth|session)[^=&[:space:]]*=)[^]&#[:space:]]*%\1***%Ig'; }
log() { echo "[slurm $(date +%H:%M:%S)] $*" | redact; }
die() { echo "[slurm] error: $*" | redact >&2; exit 2; }

: "${SLURM_JOB_ID:?not inside a Slurm job: submit with sbatch}"
ROOT=${DYNTRAIN_ROOT:-$PWD}   # the job starts in the submit directory (or sbatch --chdir)
[ -f "$ROOT/$ENTRY" ] || die "$ROOT/$ENTRY not found: submit from the repository root or set DYNTRAIN_ROOT"
cd "$ROOT"
if [ -n "${DYNTRAIN_PYTHON:-}" ]; then PY=$DYNTRAIN_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi

# ------------------------------------------------------------------------------ arguments
CONFIG=$DEFAULT_CONFIG
if [ $# -gt 0 ] && [[ "$1" != *=* && "$1" != --dry-run ]]; then CONFIG=$1; shift; fi
[ -f "$CONFIG" ] || die "config file $CONFIG not found (in $ROOT)"
OVERRIDES=()
DRY_RUN=""
for a in "$@"; do if [ "$a" = "--dry-run" ]; then DRY_RUN=1; else OVERRIDES+=("$a"); fi; done
RESTARTS=${SLURM_RESTART_COUNT:-0}
if [ "$RESTARTS" -gt 0 ]; then
    OVERRIDES+=("checkpoint.resume=auto")   # a requeued job always continues where it stopped
fi

# ------------------------------------------------------------------------- hosts and ranks
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ ${#HOSTS[@]} -gt 0 ] || die "no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
NNODES=${#HOSTS[@]}
export MASTER_ADDR=${HOSTS[0]}
export MASTER_PORT=${DYNTRAIN_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}

GPUS=${SLURM_GPUS_ON_NODE:-}
if [ -z "$GPUS" ] && command -v nvidia-smi >/dev/null 2>&1; then
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
GPUS=${GPUS:-0}
# ranks per node: DYNTRAIN_RANKS_PER_NODE, else sbatch --ntasks-per-node, else one per GPU, else 1
NPROC=${DYNTRAIN_RANKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-}}
NPROC=${NPROC%%(*}          # "2(x3)" style values: the per-node count
if [ -z "$NPROC" ]; then
    if [ "$GPUS" -gt 0 ]; then NPROC=$GPUS; else NPROC=1; fi
fi
if [ "$GPUS" -eq 0 ]; then
    export DS_ACCELERATOR=cpu
elif [ "$NPROC" -ne "$GPUS" ]; then
    log "warning: $NPROC ranks per node but $GPUS GPUs per node"
fi
WORLD=$(( NNODES * NPROC ))
CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
CPT=$(( CPUS / NPROC )); [ "$CPT" -ge 1 ] || CPT=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPT}
export LOCAL_WORLD_SIZE=$NPROC LOCAL_SIZE=$NPROC
export PYTHONUNBUFFERED=1

log "job $SLURM_JOB_ID restart $RESTARTS: $NNODES node(s) [${HOSTS[*]}] x $NPROC rank(s) = world $WORLD" \
    "($([ "$GPUS" -gt 0 ] && echo "$GPUS GPUs/node" || echo "CPU, DS_ACCELERATOR=cpu"))," \
    "master $MASTER_ADDR:$MASTER_PORT"
log "$ENTRY --config $CONFIG ${OVERRIDES[*]}"
if [ -n "$DRY_RUN" ]; then   # --dry-run: plan + pre-flight for this allocation's world size, one process
    "$PY" "$ENTRY" --config "$CONFIG" "${OVERRIDES[@]}" --dry-run --world-size "$WORLD"
    exit $?
fi

# ------------------------------------------------------------------------ preemption
SRUN_PID=""
SIGNALLED=""
forward() {
    SIGNALLED=$1
    log "SIG$1 received: asking every rank to checkpoint at the next step boundary and stop"
    if [ -n "$SRUN_PID" ]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# ---------------------------------------------------------------------------- training
# shellcheck disable=SC2016  # the inner $SLURM_* are expanded by each task, not here
srun --nodes="$NNODES" --ntasks="$WORLD" --ntasks-per-node="$NPROC" --cpus-per-task="$CPT" \
     --kill-on-bad-exit=1 --export=ALL \
     bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' \
     dyntrain-rank "$PY" "$ENTRY" --config "$CONFIG" "${OVERRIDES[@]}" &
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"; RC=$?
log "training step exited with $RC"

# -------------------------------------------------------------------------- requeue?
if [ -n "$SIGNALLED" ]; then
    if [ "$RC" -ne 0 ]; then
        log "training failed after SIG$SIGNALLED (exit $RC): not requeueing"
        exit "$RC"
    fi
    PROGRESS=$("$PY" -m dyntrain.checkpoint progress --config "$CONFIG" "${OVERRIDES[@]}") \
        || die "could not read the run's progress: $PROGRESS"
    log "progress: $PROGRESS"
    if [[ "$PROGRESS" == *"finished=1"* ]]; then
        log "run already reached run.max_steps: not requeueing"
        exit 0
    fi
    log "requeueing job $SLURM_JOB_ID (it resumes from the checkpoint just written)"
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed (the scheduler may requeue it itself)"
    exit 0
fi
exit "$RC"
