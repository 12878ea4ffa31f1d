#!/usr/bin/env bash
# The GPU check in one script, for a Hopper machine (H100/H200) with Python 3.12 and torch,
# with or without network. Wheels found in the git-ignored .whl/ folder (megatron-core,
# Transformer Engine and what they import) are installed first, all in one pip call; a
# tokenizer model there (.whl/tokenizer.model.v1) serves the TE pretraining test.
#
#   bash tools/gpu_check.sh OUT_DIR [benchmark args]
#
# Then, each part under its own time limit so that one hang cannot eat the others:
#   1. .whl/device_smoke.py when present (one te.Linear under fp8_autocast against bf16)
#   2. the gpu-marked tests (TE vs local spec, FP8, packed THD, TE run -> HF, local vs HF)
#   3. the throughput benchmark (HF eager/compile, local, TE bf16, TE FP8 delayed/tensorwise)
# OUT_DIR receives every log and figures.json, which holds every figure of the run.
# Part limits (seconds): SMOKE_S (60), TESTS_S (240), BENCH_S (420). Measured on one H200:
# the tests need a little over 170 s, the benchmark 134 s without its HF + compile row and
# 248 s for that row alone (pass --rows to leave it out).
set -uo pipefail
OUT_DIR=${1:?usage: bash tools/gpu_check.sh OUT_DIR [benchmark args]}
shift
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
started=$(date +%s)
stamp() { echo "[gpu_check] $(($(date +%s) - started)) s: $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu_check_site:$PWD
else
    export PYTHONPATH=$PWD
fi
if [[ -z "${DANUBE_TEST_TOKENIZER:-}" && -f .whl/tokenizer.model.v1 ]]; then
    export DANUBE_TEST_TOKENIZER=$PWD/.whl/tokenizer.model.v1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee "$OUT_DIR/gpu.txt"
stamp "installed"

if [[ -f .whl/device_smoke.py ]]; then
    timeout "${SMOKE_S:-60}" python3 .whl/device_smoke.py 2>&1 | tee "$OUT_DIR/smoke.log"
    stamp "smoke check: exit ${PIPESTATUS[0]}"
fi

export DANUBE_GPU_RESULTS=$OUT_DIR/gpu_tests.jsonl
rm -f "$DANUBE_GPU_RESULTS"
timeout "${TESTS_S:-240}" python3 -m pytest -p no:cacheprovider -m gpu -s -q -rs \
    tests/models/test_gpu_te.py tests/models/test_gpu_danube.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
stamp "gpu tests: exit $tests_rc"

timeout "${BENCH_S:-420}" python3 -m megatron_danube.cli.benchmark_throughput \
    --json "$OUT_DIR/benchmark.json" "$@" 2>&1 | tee "$OUT_DIR/benchmark.log"
bench_rc=${PIPESTATUS[0]}
stamp "benchmark: exit $bench_rc"

python3 - "$OUT_DIR" "$tests_rc" "$bench_rc" "$(($(date +%s) - started))" <<'EOF'
import json, os, subprocess, sys

out, tests_rc, bench_rc, elapsed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def read(name, parse):
    path = os.path.join(out, name)
    return parse(open(path)) if os.path.exists(path) else None
commit = os.environ.get("DANUBE_COMMIT") or subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
).stdout.strip()
figures = {
    "gpu": read("gpu.txt", lambda f: f.read().strip()),
    "commit": commit or None,
    "elapsed_s": elapsed,
    "tests_exit": tests_rc,
    "benchmark_exit": bench_rc,
    "tests": read("gpu_tests.jsonl", lambda f: [json.loads(line) for line in f if line.strip()]),
    "benchmark": read("benchmark.json", json.load),
}
with open(os.path.join(out, "figures.json"), "w") as f:
    json.dump(figures, f, indent=1)
print(f"[gpu_check] figures.json written; tests exit {tests_rc}, benchmark exit {bench_rc}")
EOF
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
