"""One run per run directory: an advisory lock held by rank 0 for the life of the process.

Two runs in one directory would delete each other's partial checkpoints and interleave their
metrics. The lock is `fcntl.flock` on `RUN_DIR/.lock`, so the kernel releases it when the
holder dies however it dies (no stale lock to clean up); the file names the holder for the
error message.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from megatron_danube.runtime.distributed import raise_rank0_problem

LOCK_FILE = ".lock"


class RunDirLock:
    def __init__(self, run_dir: str, is_main: bool):
        self._fd = None
        problem = ""
        if is_main:
            problem = self._acquire(run_dir)
        raise_rank0_problem(problem)  # every rank stops together when rank 0 could not lock

    def _acquire(self, run_dir: str) -> str:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return (
                f"run_dir {run_dir} is in use by {holder}; wait for that run to end, stop it, "
                f"or choose another run_dir"
            )
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode())
        self._fd = fd
        return ""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
