"""megatron's checkpoint-writer helper process, started so that a stop signal cannot kill it.

megatron's writer sends its results through a `multiprocessing.Manager` queue that it spawns
on first use. A launcher that signals the whole process group (torchrun on SIGTERM, a terminal
on Ctrl-C) kills that helper too, and the save the signal asked for then dies with
BrokenPipeError.
"""

from __future__ import annotations

import signal

from megatron_danube import compat

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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
