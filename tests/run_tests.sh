#!/usr/bin/env bash
# The README's test command. Installs the local SLURM used by the slurm tests where it can.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q -rs "$@"
