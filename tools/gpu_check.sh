#!/usr/bin/env bash
# The prepared GPU check, for one call of the device tool (H100/H200, Python 3.12, torch 2.11,
# no Transformer Engine, no network). Prepare the carried wheels once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
# then run with carry [".whl"]:  bash tools/gpu_check.sh
# It runs the gpu-marked tests (danube-1.8b local spec vs HF at 2048 and 16384) and the
# throughput benchmark (plugin vs HF eager/compile, same process); logs go to $OUT.
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
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -p no:cacheprovider -m gpu -s -q tests/models/test_gpu_danube.py 2>&1 \
    | tee "$OUT/gpu_tests.log"
python3 tools/benchmark_throughput.py "$@" 2>&1 | tee "$OUT/benchmark.log"
