"""The benchmark tools run at tiny sizes on the CPU and print their tables."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # launches training processes


def run_tool(script, *args):
    """`tools/SCRIPT ARGS` in its own process, this checkout importable."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )


def test_benchmark_throughput_tiny_on_cpu(tmp_path):
    json_path = tmp_path / "bench.json"
    out = run_tool(
        "benchmark_throughput.py",
        "--tiny",
        "--rows",
        "local,hf-eager",
        "--json",
        str(json_path),
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
    out = run_tool(
        "benchmark_preprocess.py",
        "--mb",
        "2",
        "--workers",
        "2",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| preprocess_data.py --workers 2 |" in out.stdout
    assert "| baseline: encode per line" in out.stdout


def test_benchmark_chat_data_small(tmp_path):
    json_path = tmp_path / "chat-data.json"
    out = run_tool(
        "benchmark_chat_data.py",
        "--conversations",
        "300",
        "--workers",
        "1",
        "--json",
        str(json_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| megatron_danube encode_files" in out.stdout and "| TRL " in out.stdout
    import json

    written = json.loads(json_path.read_text())
    keys = (
        "fill",
        "greedy_fill",
        "encode_tokens_per_s",
        "trl_encode_tokens_per_s",
        "encode_conversations_per_s",
        "peak_rss_bytes",
        "cache_rss_bytes",
        "hardware",
    )
    assert all(key in written for key in keys), sorted(written)
    assert written["conversations"] == written["samples"] == 300
    assert 600 <= written["mean_tokens"] <= 840  # shaped like the recipe's conversations
    for length in ("2048", "4096", "16384"):
        assert 0 < written["greedy_fill"][length] <= written["fill"][length] <= 1
    assert written["encode_tokens_per_s"] > 0 and written["trl_encode_tokens_per_s"] > 0
    assert written["peak_rss_bytes"] > 0 and written["cache_rss_bytes"] > 0
    assert written["hardware"]["cores"] >= 1 and written["hardware"]["cpu"]
