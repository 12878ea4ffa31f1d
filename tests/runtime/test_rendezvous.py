"""How ranks find each other: what fails, fails fast in one line instead of hanging."""

import os
import subprocess
import sys
import time

import pytest

from megatron_danube.errors import DanubePeerLost, DanubeRankError
from megatron_danube.runtime import rendezvous
from tests.conftest import REPO, free_port


def test_the_interface_is_the_one_that_routes_to_the_rendezvous():
    assert rendezvous.route_to("127.0.0.1", 29500) == ("lo", "127.0.0.1")
    addresses = rendezvous.interface_addresses()
    assert addresses["lo"] == "127.0.0.1"
    for name, address in addresses.items():  # each address routes out of its own interface
        assert rendezvous.route_to(address, 29500) == (name, address)


def test_gloo_interface_is_chosen_unless_the_user_chose(monkeypatch):
    # set, then removed: so that monkeypatch restores the original state (a variable left
    # behind would steer every later launch of this test session)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    rendezvous.choose_gloo_interface("127.0.0.1", 29500)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    rendezvous.choose_gloo_interface("127.0.0.1", 29500)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7"


def test_an_unresolvable_master_addr_is_one_line_naming_the_fix():
    assert rendezvous.master_address("127.0.0.1", "torchrun") == "127.0.0.1"
    with pytest.raises(DanubeRankError, match=r"MASTER_ADDR 'n1\.invalid' does not resolve on "):
        rendezvous.master_address("n1.invalid", "torchrun")


def test_a_rank_that_cannot_reach_rank_0_fails_after_the_rendezvous_timeout():
    port = free_port()  # nobody serves it
    started = time.monotonic()
    with pytest.raises(DanubeRankError) as caught:
        rendezvous.connect("127.0.0.1", port, rank=1, world_size=2, timeout_s=2)
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert message.startswith("rank 1 on ") and f"the rendezvous at 127.0.0.1:{port}" in message
    assert "within 2 s" in message and "train.rendezvous_timeout_s" in message


def test_rank_0_says_which_ranks_did_not_arrive():
    port = free_port()
    with pytest.raises(DanubeRankError, match=r"not all 2 ranks arrived within 2 s"):
        rendezvous.connect("127.0.0.1", port, rank=0, world_size=2, timeout_s=2)


def test_lost_peer_errors_are_recognised_and_others_are_not():
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms")
    lost = rendezvous.lost_peer(gloo, rank=3, timeout_minutes=0.5)
    assert isinstance(lost, DanubePeerLost) and lost.exit_code == 1
    assert str(lost).startswith("rank 3 on ") and "distributed_timeout_minutes=0.5" in str(lost)
    assert rendezvous.lost_peer(RuntimeError("shape mismatch"), rank=0, timeout_minutes=1) is None


@pytest.mark.slow
def test_a_launched_rank_without_its_peer_prints_its_own_line_and_exits_2(tmp_path):
    """Rank 1 of 2 alone (rank 0 never starts): one line from rank 1 itself, no traceback,
    within the configured rendezvous timeout."""
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        RANK="1",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    from megatron_danube.data.demo_corpus import ensure_demo_corpus
    from megatron_danube.data.tokenizer import load_tokenizer

    corpus = ensure_demo_corpus(str(tmp_path / "corpus" / "doc"), load_tokenizer("mistral-v1"))
    cmd = [sys.executable, "-m", "megatron_danube.pretrain", "--config"]
    cmd += [os.path.join(REPO, "examples", "configs", "danube-tiny-cpu.yaml")]
    cmd += [f"run_dir={tmp_path / 'run'}", f"data.blend=[{corpus}]", "train.rendezvous_timeout_s=3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and errors[0].startswith("danube-pretrain: error: rank 1 on ")
    assert "within 3 s" in errors[0] and "Traceback" not in proc.stderr
