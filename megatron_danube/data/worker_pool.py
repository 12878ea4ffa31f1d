"""Worker processes for batch work whose results must come back in order (tokenising a
corpus, encoding chat data): numbered tasks out, numbered results back, handed out in the
order submitted; `InlineWorkers` is the same interface in this process.

A worker object crosses to each process once and loads what it needs on its first batch; it
has `process_batch(task)`, and its process runs `serve_batches`.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
from typing import Callable, Dict

POLL_S = 1.0  # how often a worker checks for its parent, and a waiting parent for its workers


def serve_batches(worker, tasks, results) -> None:
    """A worker process's loop: numbered tasks in, numbered results (or errors) out."""
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it
    # (stops the workers, says so once); a worker's KeyboardInterrupt would be a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = mp.parent_process().pid
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    while True:
        number, task = tasks.get()
        try:
            results.put((number, worker.process_batch(task), None))
        except Exception as exc:
            results.put((number, None, _sendable(exc)))


def _serve_what_arrives(setup, tasks, results) -> None:
    """`serve_batches` on the worker object that arrives on `setup`. It comes by a queue,
    not as the process's argument: a spawned process reads its argument while its parent
    waits, so a child that died before reading a large one (its start failed) would leave the
    parent blocked in `start()`; a queue is written by a thread, and the parent goes on to
    find the dead worker."""
    serve_batches(setup.get(), tasks, results)


def _exit_when_orphaned(parent_pid: int) -> None:
    """A worker's watch: once its parent is gone (killed outright), the worker exits. Its own
    wait for a task cannot tell: it may be reading a task the parent died half-way through
    sending, on a pipe the worker itself holds open."""
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os._exit(1)


def _sendable(exc: Exception) -> Exception:
    """`exc`, or its text in a RuntimeError where it does not pickle: a queue drops what it
    cannot pickle, and the parent would wait for that result forever."""
    try:
        pickle.dumps(exc)
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class WorkerPool:
    """Processes that each run `serve_batches` on their own copy of one worker object.

    Tasks go out numbered on one queue; results come back numbered on another and are handed
    out in the order the tasks were submitted. Both queues send from a thread, so neither side
    blocks on a full pipe while the other waits for it. A worker that dies (killed, out of
    memory) fails the run instead of leaving it waiting for the results it held.
    """

    def __init__(self, worker, processes: int, what: str = "tokenising", fork: bool = True):
        # fork: a worker starts without importing the package again, but only from a process
        # without threads of its own (a training rank has gloo's and torch's: its forked
        # children can block forever on a lock a thread held), and only on Linux.
        ctx = mp.get_context("fork" if fork and sys.platform == "linux" else "spawn")
        self._tasks = ctx.Queue()
        self._tasks.cancel_join_thread()  # tasks left unsent when a run fails are dropped
        self._results = ctx.Queue()
        self._procs = []
        self._setups = []  # kept: a queue's parent side must outlive the child's start
        for _ in range(processes):
            setup = ctx.Queue()
            self._setups.append(setup)
            setup.cancel_join_thread()  # a worker that died never reads it
            proc = ctx.Process(
                target=_serve_what_arrives, args=(setup, self._tasks, self._results), daemon=True
            )
            proc.start()
            setup.put(worker)
            self._procs.append(proc)
        self._what = what
        self._submitted = 0
        self._arrived: Dict[int, tuple] = {}

    def submit(self, task) -> Callable[[], tuple]:
        """Send `task` to the workers; returns what waits for its result and returns it."""
        number = self._submitted
        self._tasks.put((number, task))
        self._submitted += 1
        return functools.partial(self._result, number)

    def _result(self, number: int) -> tuple:
        while number not in self._arrived:
            self._receive()
        value, error = self._arrived.pop(number)
        if error is not None:
            raise error
        return value

    def _receive(self) -> None:
        try:
            number, value, error = self._results.get(timeout=POLL_S)
        except queue.Empty:
            dead = [proc.exitcode for proc in self._procs if proc.exitcode is not None]
            if dead:
                raise RuntimeError(
                    f"a {self._what} worker process died (exit code {dead[0]}): out of memory "
                    f"(run again with fewer workers), or its start failed (its error is above)"
                ) from None
            return
        self._arrived[number] = (value, error)

    def close(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            proc.join()


class InlineWorkers:
    """`WorkerPool`'s interface over one worker in this process (workers=1)."""

    def __init__(self, worker):
        self.worker = worker

    def submit(self, task) -> Callable[[], tuple]:
        result = self.worker.process_batch(task)
        return lambda: result

    def close(self) -> None:
        """Nothing runs beside this process."""
