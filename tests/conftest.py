import os
import subprocess
import sys
import warnings

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where none is present")
    config.addinivalue_line("markers", "slurm: needs a local SLURM (installed by .ci/run)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


from megatron_danube.runtime.distributed import free_port  # noqa: E402,F401  (used by tests)


def wait_for(predicate, timeout, what, interval=0.05):
    """Poll `predicate` until true; fail the test naming `what` after `timeout` seconds."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def torchrun(script, *args, nproc=2, timeout=900, env=None):
    """Launch `script` under torchrun on this machine; return the CompletedProcess."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", script, *map(str, args),
    ]
    full_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


@pytest.fixture(scope="session")
def single_rank():
    """One gloo rank with megatron groups, for in-process model tests (CPU)."""
    from megatron_danube.models.presets import get_preset
    from megatron_danube.runtime.distributed import initialize
    from megatron_danube.config import ParallelLayout

    saved = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(var, None)
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        return initialize(get_preset("danube-test"), ParallelLayout(), seed=1234, spec="local")
    finally:
        # Never leak this process's rendezvous port to the jobs the tests launch.
        os.environ.clear()
        os.environ.update(saved)
