#!/bin/bash
# Tokenise a large corpus as a SLURM array: task i processes partition i of N, then a
# dependent job merges the partitions in order (identical to a single-process run).
#
#   N=32
#   jid=$(sbatch --parsable --array=0-$((N-1)) slurm/preprocess.sh \
#         --input /data/corpus --output-prefix /data/tok/web --tokenizer-model mistral-v1 \
#         --append-eod --partitions $N)
#   sbatch --dependency=afterok:$jid slurm/preprocess.sh --merge \
#         --output-prefix /data/tok/web --partitions $N
#
#SBATCH --job-name=danube-preprocess
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail
cd "${DANUBE_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-python3}"

if [[ "${1:-}" == "--merge" ]]; then
    shift
    prefix= partitions= key=text level=document
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --output-prefix) prefix=$2; shift 2 ;;
            --partitions) partitions=$2; shift 2 ;;
            --json-key) key=$2; shift 2 ;;
            --split-sentences) level=sentence; shift ;;
            *) echo "preprocess.sh --merge: unknown argument $1" >&2; exit 2 ;;
        esac
    done
    inputs=()
    for ((i = 0; i < partitions; i++)); do
        inputs+=("$(printf '%s_part%03d_%s_%s' "$prefix" "$i" "$key" "$level")")
    done
    exec "$PYTHON" tools/merge_datasets.py --input "${inputs[@]}" \
        --output-prefix "${prefix}_${key}_${level}"
fi

exec "$PYTHON" tools/preprocess_data.py "$@" --workers "${SLURM_CPUS_PER_TASK:-2}" \
    --partition-index "${SLURM_ARRAY_TASK_ID:?submit as an array: sbatch --array=0-N-1}" \
    --no-progress
