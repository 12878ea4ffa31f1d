#!/bin/bash
# Pretrain danube-1.8b with megatron_danube: one node of 8 x H100 (the H2O-Danube setup) by
# default; more nodes with `sbatch --nodes=N`.
#
#   sbatch slurm/pretrain_1.8b.sh [section.key=value ...]
#   CONFIG=examples/configs/danube2-1.8b.yaml sbatch --nodes=4 slurm/pretrain_1.8b.sh
#
# Launch: srun, one task per GPU. Every rank is a SLURM task, so SLURM's own variables
# (SLURM_PROCID/NTASKS/LOCALID) give rank and world size, signals reach every rank directly,
# and there is no second launcher (torchrun) between SLURM and the trainer to forward them.
#
# Preemption and time limits: SLURM sends USR1 to this script 5 minutes before the limit;
# the script forwards it to the trainer, which saves at the next step boundary and exits 0,
# and the job is requeued; the requeued run resumes from the checkpoint. `scancel
# --signal=TERM` (or preemption's TERM) makes the ranks save and exit 0 the same way.
#
# Environment (all optional):
#   CONFIG            run config (default examples/configs/danube-1.8b.yaml)
#   RUN_DIR           run directory (default: the config's run_dir)
#   DANUBE_OVERRIDES  extra key=value overrides, space separated (arguments are added too)
#   DANUBE_HOME       the megatron_danube checkout (default: the submit directory)
#   PYTHON            python with megatron_danube installed (default python3)
#   CONTAINER_IMAGE   pyxis/enroot image; CONTAINER_MOUNTS its mounts (srun --container-*)
#   MASTER_PORT       rendezvous port (default: derived from the job id)
#   DANUBE_ENTRY      the module to run (default megatron_danube.pretrain; finetune_1.8b.sh
#                     sets megatron_danube.finetune)
#
#SBATCH --job-name=danube-1.8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

cd "${DANUBE_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
CONFIG="${CONFIG:-examples/configs/danube-1.8b.yaml}"
PYTHON="${PYTHON:-python3}"
if [[ ! -f "$CONFIG" ]]; then
    echo "pretrain_1.8b.sh: error: config $CONFIG not found (set CONFIG or DANUBE_HOME)" >&2
    exit 2
fi

OVERRIDES=(${DANUBE_OVERRIDES:-} "$@")
if [[ -n "${RUN_DIR:-}" ]]; then
    OVERRIDES+=("run_dir=$RUN_DIR")
else
    RUN_DIR=$("$PYTHON" - "$CONFIG" "${OVERRIDES[@]}" <<'PY'
import sys
from megatron_danube.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).run_dir)
PY
)
fi
mkdir -p "$RUN_DIR/logs"

# Rendezvous: the first node of the allocation hosts the TCP store, reached at its NodeAddr
# (the address SLURM itself reaches it at: node names may resolve only on some hosts).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
node_addr=$(scontrol show node -o "$first_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
export MASTER_ADDR=${node_addr:-$first_node}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

CONTAINER_ARGS=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    CONTAINER_ARGS+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$(pwd)")
    [[ -n "${CONTAINER_MOUNTS:-}" ]] && CONTAINER_ARGS+=(--container-mounts="$CONTAINER_MOUNTS")
fi

LOG="$RUN_DIR/logs/train-${SLURM_JOB_ID}.log"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s), \
$SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT, config $CONFIG, log $LOG"

requeue=0
srun_pid=
forward_stop() {
    # Time limit near (USR1) or preempted (TERM): the ranks save and exit, then we requeue.
    requeue=1
    [[ -n "$srun_pid" ]] && kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap forward_stop USR1 TERM

srun --kill-on-bad-exit=1 --label "${CONTAINER_ARGS[@]}" --output="$LOG" \
    "$PYTHON" -m "${DANUBE_ENTRY:-megatron_danube.pretrain}" --config "$CONFIG" "${OVERRIDES[@]}" &
srun_pid=$!
status=0
# `wait` returns early when a trapped signal arrives: keep waiting for srun itself.
while true; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [[ $requeue -eq 1 && $status -eq 0 ]]; then
    echo "saved on signal; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
