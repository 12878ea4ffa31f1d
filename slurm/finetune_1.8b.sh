#!/bin/bash
# Chat fine-tuning (SFT) of danube-1.8b: one node of 8 x H100 by default.
#
#   sbatch slurm/finetune_1.8b.sh [section.key=value ...]
#   sbatch slurm/finetune_1.8b.sh checkpoint.load=/models/h2o-danube-1.8b-base
#
# The same launcher as pretrain_1.8b.sh (srun, one task per GPU; USR1 before the time limit
# or TERM -> every rank saves at a step boundary -> requeue -> resume), running
# megatron_danube.finetune with examples/configs/danube-1.8b-sft.yaml unless CONFIG says
# otherwise. The environment variables of pretrain_1.8b.sh apply.
#
#SBATCH --job-name=danube-1.8b-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
cd "${DANUBE_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
export CONFIG="${CONFIG:-examples/configs/danube-1.8b-sft.yaml}"
export DANUBE_ENTRY=megatron_danube.finetune
# exec: this shell becomes the launcher, so SLURM's USR1/TERM reach its traps directly.
exec bash slurm/pretrain_1.8b.sh "$@"
