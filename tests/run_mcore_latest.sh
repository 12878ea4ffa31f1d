#!/usr/bin/env bash
# The newest supported megatron-core line (0.19.x, which needs Python >= 3.12) on the CPU: the
# fast tier, the layout-parity launch, the resume and checkpoint tests (the cross-version ones
# against another interpreter's megatron-core: DANUBE_OTHER_PYTHON, else python3 and friends),
# conversion both ways.
# The virtual environment lives in .cache/py312 and is reused while it is a Python 3.12 one;
# pip's own cache keeps a rebuild short. Arguments go to both pytest runs (e.g. -x).
# DANUBE_LEG=install stops after installing, DANUBE_LEG=tests skips it (.ci/run installs while
# the first leg's tests run).
set -euo pipefail
LEG="${DANUBE_LEG:-all}"
cd "$(dirname "$0")/.."
MCORE="${DANUBE_MCORE_LATEST:-megatron-core>=0.19.2,<0.20}"
VENV=.cache/py312
PY="$VENV/bin/python"

step() {
    echo "mcore-latest: $1 (at ${SECONDS}s)"
}

# A Python 3.12 found by name: `python3.12` on PATH when it runs; where that is a pyenv shim
# for a version pyenv does not have selected (it exits with "command not found"), the 3.12
# that pyenv has installed.
runs_312() {
    "$@" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}
find_python312() {
    local candidate version
    if candidate=$(command -v python3.12) && runs_312 "$candidate"; then
        echo "$candidate"
        return 0
    fi
    if command -v pyenv >/dev/null; then
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -rV); do
            if candidate=$(PYENV_VERSION="$version" pyenv which python3.12 2>/dev/null) \
                && runs_312 "$candidate"; then
                echo "$candidate"
                return 0
            fi
        done
    fi
    return 1
}
if [[ "$LEG" != tests ]]; then
if ! python312=$(find_python312); then
    echo "mcore-latest: no working python3.12 on PATH or in pyenv (megatron-core 0.17+ needs" \
        "Python >= 3.12); install Python 3.12 and put python3.12 on PATH" >&2
    exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    step "creating $VENV with $python312"
    rm -rf "$VENV"
    "$python312" -m venv "$VENV"
fi
step "installing (pip only checks what is already there)"
"$PY" -m pip install -q --upgrade pip
# PyPI has no CPU build of torch for Python 3.12: this is the CUDA build (about 4.7 GB
# installed), which runs on the CPU like the CPU build does.
"$PY" -m pip install -q "torch==2.13.0" -e ".[test]"
"$PY" -m pip install -q --upgrade "$MCORE"
"$PY" - <<'EOF'
import logging
import sys

import torch

from megatron_danube import compat

logging.basicConfig(level=logging.INFO, format="mcore-latest: %(message)s")
logging.info(
    "Python %s, torch %s, megatron-core %s",
    sys.version.split()[0],
    torch.__version__,
    compat.MCORE_VERSION_STRING,
)
EOF

fi
[[ "$LEG" == install ]] && exit 0

step "fast tier"
# Not the FlexAttention kernel compiled for the CPU (20 s): torch's own code, and the same torch
# release as the first leg's.
"$PY" -m pytest -q -rs -m "not slow" "$@" \
    --deselect tests/models/test_local_layers.py::test_flex_attention_path_matches_naive_reference_on_cpu

step "parity, resume, checkpoints (both releases), conversion"
# What the release can change: parity, exact resume, async and signal-time saves (megatron's
# writer helpers), skipped steps, checkpoints across releases, conversion. The launcher's own
# signal handling, the pipeline-layout resume (parity covers PP) and the non-finite-step stops
# (our own code around megatron's step) run on python3 only.
RESUME=tests/training/test_pretrain_resume.py
"$PY" -m pytest -q -rs -m slow "$@" \
    tests/parallel \
    "$RESUME" \
    tests/training/test_checkpointing.py \
    tests/training/test_checkpoint_cross_version.py \
    tests/tools/test_convert_checkpoint.py \
    --deselect "$RESUME::test_resume_pp2_is_bitwise_identical" \
    --deselect "$RESUME::test_sigterm_to_the_launcher_saves[torch.distributed.run-1]" \
    --deselect "$RESUME::test_a_second_sigterm_to_danube_launch_stops_now_without_a_traceback" \
    --deselect "$RESUME::test_sigterm_in_the_first_second_is_honoured" \
    --deselect "$RESUME::test_checkpoint_on_sigterm_saves_exits_zero_and_resumes" \
    --deselect "$RESUME::test_rerunning_a_finished_run_says_so_and_records_nothing_twice" \
    --deselect "$RESUME::test_checkpoint_killed_mid_save_leaves_previous_latest_loadable" \
    --deselect "$RESUME::test_sigterm_to_the_launcher_saves[megatron_danube.cli.launch-0]" \
    --deselect "$RESUME::test_checkpoint_after_nonfinite_losses_stops_the_run" \
    --deselect "$RESUME::test_divergence_never_replaces_healthy_checkpoints"

step "done"
