"""Where megatron's checkpoint writer sends its results: a helper process for async saves,
started so that a stop signal cannot kill it; a queue of this process for synchronous ones.

megatron's writer sends its results through a `multiprocessing.Manager` queue that it spawns
on first use. A launcher that signals the whole process group (torchrun on SIGTERM, a terminal
on Ctrl-C) kills that helper too, and the save the signal asked for then dies with
BrokenPipeError. A synchronous save writes and collects its results in the saving process, so
it needs no helper: without one it also saves the helper's start and its import of torch (to
unpickle the results), about two seconds of CPU per rank at the first save.
"""

from __future__ import annotations

import queue
import signal

from megatron_danube import compat

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def prepare_results_queue(async_saves: bool) -> None:
    """Before megatron's writer asks for its results queue: for `async_saves`, its helper
    process, deaf to stop signals; else (unless the helper runs already) a queue of this
    process."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if async_saves:
        if isinstance(getattr(filesystem_async, "_results_queue", None), queue.Queue):
            # a synchronous save came first in this process: async ones need the helper
            filesystem_async._results_queue = None
        start_writer_helpers_immune_to_signals()
        return
    # The writer's own calls on it are put and get_nowait, which queue.Queue has. A release
    # without the global (getattr's False) keeps its own way.
    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()


def start_writer_helpers_immune_to_signals() -> None:
    """Start megatron's checkpoint-writer helper process now, deaf to SIGTERM/SIGINT/SIGUSR1.

    A process spawned while a signal is ignored keeps ignoring it, so the helper is started
    here with the stop signals ignored, then the handlers come back. Call it before megatron's
    writer first starts the helper itself; later calls do nothing.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    start = getattr(filesystem_async, compat.FEATURES.writer_queue_helper, None)
    if start is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
