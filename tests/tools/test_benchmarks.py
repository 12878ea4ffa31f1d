"""The benchmark tools run at tiny sizes on the CPU and print their tables."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # launches training processes


def test_benchmark_throughput_tiny_on_cpu():
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "benchmark_throughput.py"),
            "--tiny",
            "--baselines",
            "eager",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [
        line
        for line in out.stdout.splitlines()
        if line.startswith("| megatron_danube") or line.startswith("| HF")
    ]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3].replace(",", "")) > 0  # tokens/s
        assert cells[7].endswith("x")
    assert "matmul peak measured" in out.stdout


def test_benchmark_preprocess_small():
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "benchmark_preprocess.py"),
            "--mb",
            "2",
            "--workers",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| preprocess_data.py --workers 2 |" in out.stdout
    assert "| baseline: encode per line" in out.stdout
