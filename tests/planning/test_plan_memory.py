"""The planner's deterministic memory equals what the trainer's build allocates, rank by rank.

One torchrun launch (4 gloo ranks, fp32) builds danube-tiny and danube-test at TP=2 (DP=2),
PP=2 (DP=2), PP=2 x VPP=2 (DP=2), TP=2 x PP=2 and DP=4, each with and without the distributed
optimizer, through `build_model` + `wrap_for_training`, takes one step, and reports the bytes
of the weights, the DDP gradient buffers and the optimizer state of every rank.
"""

import json
import os

import pytest

from tests.conftest import REPO
from tests.launch import torchrun

pytestmark = pytest.mark.slow  # one 4-rank launch

WORKER = os.path.join(REPO, "tests", "planning", "plan_memory_worker.py")
SHAPES = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "pp2_vpp2": (1, 2, 2), "tp2_pp2": (2, 2, 1)}
SHAPES["dp4"] = (1, 1, 1)
PARTS = ("weights", "gradients", "optimizer_state", "optimizer_counters")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_memory") / "bytes.json"
    proc = torchrun(WORKER, out, nproc=4, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"worker failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def predicted(case: str, record: dict) -> dict:
    from megatron_danube.models.presets import get_preset
    from megatron_danube.planning.layout import PlanLayout
    from megatron_danube.planning.memory import Build, static_memory

    preset, shape, optimizer = case.split("/")
    tp, pp, vpp = SHAPES[shape]
    layout = PlanLayout(tp, pp, vpp, record["dp"], 1, optimizer == "distopt", None)
    mem = static_memory(
        get_preset(preset),
        layout,
        Build(param_bytes=4, spec="local"),
        record["pp_rank"],
        record["dp_rank"],
    )
    return {part: getattr(mem, part) for part in PARTS}


@pytest.mark.parametrize("preset", ["danube-tiny", "danube-test"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("optimizer", ["plain", "distopt"])
def test_static_memory_is_exact_on_every_rank(measured, preset, shape, optimizer):
    case = f"{preset}/{shape}/{optimizer}"
    for record in measured[case]:
        got = {part: record[part] for part in PARTS}
        assert predicted(case, record) == got, (case, record["rank"])
    # the optimizer's share is 1/DP under the distributed optimizer (padding aside)
    state = [r["optimizer_state"] for r in measured[case]]
    assert min(state) > 0
