"""Packed chat fine-tuning equals the same conversations one at a time (fp32, CPU, 2 ranks).

One torchrun launch covers TP=1 x DP=2, TP=2 + sequence parallel (micro-batch 1 x 8 and
2 x 4), PP=2 (1 x 8 and 2 x 4), and a negative control that packs without document bounds.
Loss sums and per-token-averaged gradients must match the unpacked reference within 1e-5.
"""

import json
import os

import pytest

from tests.conftest import REPO
from tests.launch import torchrun

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
WORKER = os.path.join(REPO, "tests", "training", "sft_parity_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_parity") / "results.json"
    proc = torchrun(WORKER, out, nproc=2, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"worker failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def assert_matches(results, name):
    case, ref = results[name], results["reference"]
    assert "error" not in case, case.get("error")
    assert case["supervised"] == ref["supervised"]
    assert case["loss_rel"] <= TOLERANCE, case
    assert case["grad_rel"] <= TOLERANCE, case


@pytest.mark.parametrize(
    "name", ["tp1_dp2", "tp2_sp_mbs1x8", "tp2_sp_mbs2x4", "pp2_mbs1x8", "pp2_mbs2x4"]
)
def test_packed_equals_unpacked(results, name):
    assert_matches(results, name)


def test_reference_has_several_conversations_per_row(results):
    assert results["reference"]["samples"] > 8  # 8 rows: some rows hold 2+ conversations


def test_control_without_document_bounds_differs(results):
    case = results["control_no_document_bounds"]
    assert "error" not in case, case.get("error")
    assert case["grad_rel"] > 100 * TOLERANCE, case
