#!/usr/bin/env bash
# The GPU check in one script, for a Hopper machine (H100/H200) with Python 3.12 and torch but
# without network, Transformer Engine or megatron-core: it installs the wheels found in the
# git-ignored .whl/ folder (megatron-core, Transformer Engine and what they import, all in one
# pip call), runs .whl/device_smoke.py when present (one te.Linear under fp8_autocast against
# bf16), the gpu-marked tests and the throughput benchmark; logs go to $OUT.
#
#   mkdir -p .whl && cp /path/to/wheels/*.whl .whl/ && bash tools/gpu_check.sh [benchmark args]
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
if [[ -f .whl/device_smoke.py ]]; then
    python3 .whl/device_smoke.py 2>&1 | tee "$OUT/te_smoke.log"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -p no:cacheprovider -m gpu -s -q tests/models/test_gpu_danube.py 2>&1 \
    | tee "$OUT/gpu_tests.log"
python3 -m megatron_danube.cli.benchmark_throughput "$@" 2>&1 | tee "$OUT/benchmark.log"
