"""Start a run: read the launcher's variables, pick the backend, make megatron's groups, seed.

Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK) and srun (SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID), and as a single plain process. On a machine without CUDA it uses gloo and
applies `cpu_compat` (and only there).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_danube import compat
from megatron_danube.config import ParallelLayout
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.layer_specs import resolve_spec
from megatron_danube.models.presets import DanubeModelConfig
from megatron_danube.models.te_support import check_fp8
from megatron_danube.runtime.layout import validate_layout


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def _int_env(env, name) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DanubeConfigError(
            f"environment variable {name}={env[name]!r} is not an integer"
        ) from None


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: scontrol's answer, or our own parse without it."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """ "node[01-04,07]" -> "node01"; "a,b" -> "a"; "gpu[3]" -> "gpu3"."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = nodelist.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def read_launch_env(env: Optional[dict] = None) -> LaunchEnv:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
    else:
        rank, world, local, launcher = 0, 1, 0, "single"
    if not 0 <= rank < world:
        raise DanubeConfigError(f"rank {rank} is outside world size {world}; check the launcher")
    addr = env.get("MASTER_ADDR")
    if addr is None:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = _first_slurm_host(nodelist) if (launcher == "slurm" and nodelist) else "127.0.0.1"
    if "MASTER_PORT" in env:
        port = _int_env(env, "MASTER_PORT")
    elif launcher == "slurm" and "SLURM_JOB_ID" in env:
        port = 20000 + _int_env(env, "SLURM_JOB_ID") % 20000
    elif launcher == "single":
        port = free_port()  # nothing else joins: any free port will do
    else:
        port = 29500
    return LaunchEnv(rank, world, local, addr, port, launcher)


def free_port() -> int:
    """A TCP port free on this host now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Runtime:
    launch: LaunchEnv
    device: torch.device
    spec: str
    layout: ParallelLayout

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    @property
    def data_parallel(self) -> int:
        return self.layout.data_parallel(self.world_size)


def resolve_device(requested: str) -> str:
    if requested not in ("auto", "cuda", "cpu"):
        raise DanubeConfigError(f"train.device={requested!r}; choose auto, cuda or cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DanubeConfigError("train.device=cuda but no CUDA GPU is visible; use auto or cpu")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def check_layout(
    model: DanubeModelConfig,
    layout: ParallelLayout,
    *,
    spec: str = "auto",
    device: str = "auto",
    seq_length: Optional[int] = None,
    env: Optional[dict] = None,
    fp8: Optional[str] = None,
) -> tuple:
    """Validate everything that can be checked before a process group exists."""
    compat.check_supported()
    launch = read_launch_env(env)
    device_type = resolve_device(device)
    resolved_spec = resolve_spec(spec, device_type)
    check_fp8(fp8, resolved_spec, device_type)
    model.validate()
    validate_layout(layout, model, launch.world_size, spec=resolved_spec, seq_length=seq_length)
    return launch, device_type, resolved_spec


def initialize(
    model: DanubeModelConfig,
    layout: ParallelLayout,
    *,
    seed: int = 1234,
    spec: str = "auto",
    device: str = "auto",
    seq_length: Optional[int] = None,
    timeout_minutes: float = 30.0,
    rendezvous_timeout_s: float = 300.0,
    checked: Optional[tuple] = None,
) -> Runtime:
    """Validate the layout (unless `checked`, check_layout's answer, is passed), then init
    torch.distributed (see `rendezvous`) and megatron's parallel groups; collectives give up
    after `timeout_minutes`."""
    launch, device_type, resolved_spec = checked or check_layout(
        model, layout, spec=spec, device=device, seq_length=seq_length
    )
    if device_type == "cuda":
        torch.cuda.set_device(launch.local_rank)
        torch_device = torch.device("cuda", launch.local_rank)
        backend = "nccl"
    else:
        from megatron_danube.runtime import cpu_compat

        cpu_compat.apply()
        torch_device = torch.device("cpu")
        backend = "gloo"

    if not dist.is_initialized():
        from megatron_danube.runtime.rendezvous import start_process_group

        start_process_group(
            backend,
            launch.master_addr,
            launch.master_port,
            launch.rank,
            launch.world_size,
            launch.launcher,
            rendezvous_timeout_s=rendezvous_timeout_s,
            timeout_minutes=timeout_minutes,
        )
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=(
            layout.virtual_pipeline if layout.virtual_pipeline > 1 else None
        ),
        context_parallel_size=layout.context_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    return Runtime(launch=launch, device=torch_device, spec=resolved_spec, layout=layout)


def all_ranks_agree(ok, device=None) -> bool:
    """True when `ok` (a bool, or a bool tensor on `device`) holds on every rank.

    One all-reduce and one host sync, whatever the number of ranks.
    """
    flag = torch.as_tensor(ok, device=device).to(torch.float32).reshape(1)
    if device is None and dist.is_initialized() and dist.get_backend() == "nccl":
        flag = flag.cuda()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def raise_rank0_problem(problem: str) -> None:
    """Raise rank 0's one-line `problem` (empty: none) on every rank, so all stop together."""
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise DanubeConfigError(problem)


LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "MASTER_ADDR",
    "MASTER_PORT",
    # torchrun's agent: a child that sees these joins (and waits on) the agent's store
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
)


def is_launcher_var(name: str) -> bool:
    return name in LAUNCHER_VARS or name.startswith("TORCHELASTIC_")


def launcher_free_env() -> dict:
    """This process's environment without the launcher's rank variables, for a child process
    that must start its own one-rank group (e.g. a converter run from rank 0)."""
    return {k: v for k, v in os.environ.items() if not is_launcher_var(k)}


@contextlib.contextmanager
def single_process_env():
    """Hide launcher variables while a tool starts its own one-process group.

    Restored afterwards, so a rendezvous port picked here never leaks into jobs the process
    launches later (tests do launch them).
    """
    saved = dict(os.environ)
    for var in [k for k in os.environ if is_launcher_var(k)]:
        os.environ.pop(var)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def initialize_single_process(model: DanubeModelConfig, seed: int = 1234) -> Runtime:
    """One gloo rank with megatron's groups in this process (tools, in-process tests)."""
    with single_process_env():
        return initialize(model, ParallelLayout(), seed=seed, spec="local", device="cpu")


def seed_everything(seed: int) -> None:
    """Same seed on every rank for data order; megatron's tracker gives TP ranks their own."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
