"""The chat cache across ranks: built once, memory-mapped by the others (2-rank launches)."""

import json

import pytest

from tests.launch import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_danube.data.demo_chat import conversations

    path = tmp_path_factory.mktemp("chat") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations()[0] * 2))
    return str(path)


def run(tmp_path, data, mode):
    out = tmp_path / "out"
    proc = torchrun("tests/data/chat_cache_worker.py", data, tmp_path / "cache", mode, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in (0, 1)]


def test_one_rank_builds_and_every_rank_maps_the_same_files(tmp_path, data):
    first, second = run(tmp_path, data, "shared")
    assert first["mapped"] and second["mapped"]
    assert first["file"] == second["file"]  # one copy, in the page cache
    assert first["samples"] == second["samples"] == 560
    assert first["token_sum"] == second["token_sum"]


def test_a_node_that_cannot_see_the_cache_builds_its_own(tmp_path, data):
    first, second = run(tmp_path, data, "per-node")
    assert first["file"] != second["file"] and "node1" in second["file"]
    assert first["token_sum"] == second["token_sum"] and second["mapped"]
