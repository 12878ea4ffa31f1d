import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope="session")
def single_rank():
    """One gloo rank with megatron groups, for in-process model tests (CPU)."""
    from megatron_danube.models.presets import get_preset
    from megatron_danube.runtime.distributed import initialize_single_process

    return initialize_single_process(get_preset("danube-test"))
