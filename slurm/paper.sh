#!/usr/bin/env bash
# The whole paper on a Slurm cluster with ONE command: pre-training, then fine-tuning from its last
# checkpoint, then evaluation and registration of the fine-tuned model, as three jobs chained with
# --dependency=afterok (a failed job stops the chain; its dependants are never started).
#
# Submit from the repository root on a login node (it calls sbatch itself):
#   bash slurm/paper.sh [--toy] [--run-dir DIR] [--name NAME] [--alias ALIAS] [--from STAGE]
#        [--pretrain-config F] [--finetune-config F]
#        [--pretrain KEY=VALUE]... [--finetune KEY=VALUE]... [--all KEY=VALUE]... [SBATCH_OPTION ...]
# e.g.
#   bash slurm/paper.sh --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 --time=48:00:00 \
#       --run-dir /shared/runs/paper --name dynet-allinone \
#       --all tracking.uri=https://mlflow.example.org \
#       --pretrain 'data.train_urls=[s3://bucket/shards/*.tar]' --finetune data.root=/shared/data/allinone
#
#   pretrain  slurm/pretrain.sbatch PRETRAIN_CONFIG checkpoint.dir=DIR/pretrain/checkpoints ...
#   finetune  slurm/finetune.sbatch FINETUNE_CONFIG init.checkpoint=DIR/pretrain/checkpoints
#             checkpoint.dir=DIR/finetune/checkpoints tracking.log_model=true ...      (afterok)
#   evaluate  this file, one task: launch/evaluate.py on the newest fine-tuning checkpoint (the
#             FINETUNE_CONFIG's eval.sets), metrics into the fine-tuning run; then
#             launch/compare.py --promote registers that run's model as NAME and points @ALIAS
#             (default candidate) at the new version                                    (afterok)
# It prints the job ids as "stage=JOBID" lines.
#
# --toy: the CPU quickstart configs (configs/quickstart.yaml, configs/finetune_quickstart.yaml) as
# the defaults. --from finetune|evaluate: submit only from that stage on (the earlier stages' output
# is already in DIR). SBATCH_OPTION (anything else starting with -) goes to the two training jobs;
# the evaluation gets the same without the node, task and GPU counts, and one node, one task (and
# one GPU when the training jobs asked for GPUs).
# Every job is resumable: the training jobs requeue themselves on preemption and continue from their
# newest checkpoint (slurm/_launch.sh); the evaluation is safe to run again (the same metrics logged
# again, the alias set again). KEY=VALUE overrides go to a stage's launcher (--all: to every stage).
# DYNTRAIN_ROOT, DYNTRAIN_PYTHON as for the sbatch files; MLflow and S3 credentials come from the
# submitting environment (sbatch exports it), never from the command line.
set -uo pipefail

ROOT=${DYNTRAIN_ROOT:-$PWD}
if [ -n "${DYNTRAIN_PYTHON:-}" ]; then PY=$DYNTRAIN_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
log() { echo "[paper $(date +%H:%M:%S)] $*"; }
die() { echo "[paper] error: $*" >&2; exit 2; }
[ -f "$ROOT/slurm/_launch.sh" ] || die "$ROOT/slurm/_launch.sh not found: run from the repository root or set DYNTRAIN_ROOT"

# ------------------------------------------------------------------- inside the evaluation job
if [ "${PAPER_STAGE:-}" = evaluate ]; then
    cd "$ROOT"
    : "${PAPER_CONFIG:?}" "${PAPER_NAME:?}" "${PAPER_ALIAS:?}"
    log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: evaluate and register on $(hostname)"
    progress=$("$PY" -m dyntrain.checkpoint progress --run --config "$PAPER_CONFIG" "$@") \
        || die "could not read the fine-tuning checkpoints: $progress"
    log "fine-tuning: $progress"
    read -r dir tag run < <(sed -n 's/.* dir=\(.*\) tag=\([^ ]*\) run=\([^ ]*\)$/\1 \2 \3/p' <<<"$progress")
    [ -n "${tag:-}" ] && [ "$tag" != none ] || die "no complete fine-tuning checkpoint in $dir"
    [ "$run" != none ] || die "$dir/$tag records no MLflow run (tracking.enabled=false?): nothing to register"
    "$PY" launch/evaluate.py --checkpoint "$dir/$tag" --run-id "$run" --config "$PAPER_CONFIG" "$@" \
        || die "evaluation of $dir/$tag failed"
    uri=()
    for kv in "$@"; do [[ "$kv" == tracking.uri=* ]] && uri=(--tracking-uri "${kv#tracking.uri=}"); done
    "$PY" launch/compare.py --config "$PAPER_CONFIG" "${uri[@]}" --promote "$run" --alias "$PAPER_ALIAS" \
        --name "$PAPER_NAME" || die "registering run $run's model as $PAPER_NAME failed"
    exit 0
fi

# ------------------------------------------------------------------------------- the submitter
pre_cfg="" ft_cfg="" toy=0
run_dir=runs/paper name=dynet-allinone alias=candidate from=pretrain
pre=() ft=() all=() train_opts=() eval_opts=() gpus=0
while [ $# -gt 0 ]; do
    case "$1" in
        --toy) toy=1; shift ;;
        --run-dir|--name|--alias|--from|--pretrain-config|--finetune-config|--pretrain|--finetune|--all)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --run-dir) run_dir=$2 ;; --name) name=$2 ;; --alias) alias=$2 ;; --from) from=$2 ;;
                --pretrain-config) pre_cfg=$2 ;; --finetune-config) ft_cfg=$2 ;;
                --pretrain) pre+=("$2") ;; --finetune) ft+=("$2") ;; --all) all+=("$2") ;;
            esac
            shift 2 ;;
        -*) train_opts+=("$1")
            case "$1" in
                --nodes*|-N*|--ntasks*|-n*|--gpus*|--gres*|-G*|--cpus-per-task*|-c*) ;;
                *) eval_opts+=("$1") ;;
            esac
            case "$1" in --gpus*|--gres=gpu*|-G*) gpus=1 ;; esac
            shift ;;
        *) die "unexpected argument '$1' (overrides go after --pretrain, --finetune or --all)" ;;
    esac
done
if [ "$toy" = 1 ]; then
    pre_cfg=${pre_cfg:-configs/quickstart.yaml} ft_cfg=${ft_cfg:-configs/finetune_quickstart.yaml}
fi
pre_cfg=${pre_cfg:-configs/pretrain.yaml} ft_cfg=${ft_cfg:-configs/finetune_allinone.yaml}
case "$from" in pretrain|finetune|evaluate) ;; *) die "--from: pretrain, finetune or evaluate, got '$from'" ;; esac
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "--name: a registered-model name (letters, digits, . _ -), got '$name'"
for cfg in "$pre_cfg" "$ft_cfg"; do [ -f "$ROOT/$cfg" ] || [ -f "$cfg" ] || die "config file $cfg not found"; done
for kv in "${pre[@]}" "${ft[@]}" "${all[@]}"; do [[ "$kv" == *=* ]] || die "override '$kv' is not KEY=VALUE"; done
case "$run_dir" in /*) ;; *) run_dir=$ROOT/$run_dir ;; esac   # the jobs start in ROOT; say it absolutely
mkdir -p "$run_dir" || die "cannot create --run-dir $run_dir"
pre_ckpt=$run_dir/pretrain/checkpoints ft_ckpt=$run_dir/finetune/checkpoints
pre_args=("$pre_cfg" "${all[@]}" "checkpoint.dir=$pre_ckpt" "${pre[@]}")
ft_args=("$ft_cfg" "${all[@]}" "init.checkpoint=$pre_ckpt" "checkpoint.dir=$ft_ckpt"
         "tracking.log_model=true" "${ft[@]}")
[ "$gpus" = 1 ] && eval_opts+=(--gpus=1)

common=(--parsable --chdir="$ROOT" --export=ALL --open-mode=append)
last=""
submit() {  # submit STAGE [sbatch options] -- script [arguments]
    local stage=$1; shift
    local opts=()
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    local id
    id=$(sbatch "${common[@]}" --job-name="dynet-$stage" --output="$run_dir/slurm-$stage-%j.out" \
             ${last:+--dependency=afterok:$last} "${opts[@]}" "$@") || die "sbatch ($stage) failed"
    id=${id%%;*}
    echo "$stage=$id"
    last=$id
}
if [ "$from" = pretrain ]; then
    submit pretrain "${train_opts[@]}" -- "$ROOT/slurm/pretrain.sbatch" "${pre_args[@]}"
fi
if [ "$from" != evaluate ]; then
    submit finetune "${train_opts[@]}" -- "$ROOT/slurm/finetune.sbatch" "${ft_args[@]}"
fi
PAPER_STAGE=evaluate PAPER_CONFIG=$ft_cfg PAPER_NAME=$name PAPER_ALIAS=$alias \
    submit evaluate --nodes=1 --ntasks=1 --requeue "${eval_opts[@]}" -- \
    "$ROOT/slurm/paper.sh" "${ft_args[@]:1}"
