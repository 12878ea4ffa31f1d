import pytest

from megatron_danube.config import ParallelLayout
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.presets import get_preset
from megatron_danube.runtime.distributed import (
    _first_slurm_host,
    check_layout,
    parse_first_host,
    read_launch_env,
)


def test_torchrun_variables():
    e = read_launch_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "1234",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3,
        4,
        1,
        "n1",
        1234,
        "torchrun",
    )


def test_slurm_variables_and_rendezvous_from_nodelist():
    e = read_launch_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "5",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (5, 16, 5, "slurm")
    assert e.master_addr.startswith("gpu07")
    assert e.master_port == 20000 + 4242


def test_single_process_defaults():
    e = read_launch_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")


def test_nodelist_parsing_without_scontrol():
    assert parse_first_host("node[01-04,07]") == "node01"
    assert parse_first_host("node[07,01-04]") == "node07"
    assert parse_first_host("gpu[3]") == "gpu3"
    assert parse_first_host("alpha,beta") == "alpha"
    assert parse_first_host("solo") == "solo"
    assert _first_slurm_host("alpha,beta") == "alpha"


def test_bad_launcher_values_are_one_line_errors():
    with pytest.raises(DanubeConfigError, match="RANK='x' is not an integer"):
        read_launch_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(DanubeConfigError, match="rank 4 is outside world size 4"):
        read_launch_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_layout_is_checked_before_any_process_group():
    with pytest.raises(DanubeConfigError, match="world size 3 is not divisible"):
        check_layout(
            get_preset("danube-test"),
            ParallelLayout(tensor_parallel=2),
            env={"RANK": "0", "WORLD_SIZE": "3"},
        )
