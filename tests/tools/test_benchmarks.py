"""The benchmark tools run at tiny sizes on the CPU and print their tables."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # launches training processes


def test_benchmark_throughput_tiny_on_cpu(tmp_path):
    json_path = tmp_path / "bench.json"
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "benchmark_throughput.py"),
            "--tiny",
            "--rows",
            "local,hf-eager",
            "--json",
            str(json_path),
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
    assert "matmul measured" in out.stdout
    import json

    written = json.loads(json_path.read_text())
    assert written["meta"]["baseline"] == "hf-eager"
    assert [(r["kind"], r["seq"]) for r in written["rows"]] == [
        ("local", 64),
        ("local", 128),
        ("hf-eager", 64),
        ("hf-eager", 128),
    ]
    assert all(r["tokens_per_s"] > 0 for r in written["rows"])
    assert [r["vs_baseline"] for r in written["rows"][2:]] == [1.0, 1.0]


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
