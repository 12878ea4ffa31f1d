"""What every command shares: logging, signal handling from the start, and one-line errors.

A `DanubeConfigError` (bad input) exits 2 with one line naming the problem and the fix. A
missing optional dependency exits 2 naming the extra that installs it, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn, Optional, Sequence

from megatron_danube.errors import DanubeConfigError, DanubeRankError, missing_extra_message


def run_command(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    body: Callable[[argparse.Namespace], int],
    argv: Optional[Sequence[str]] = None,
    logging_setup: Optional[Callable[[], None]] = None,
) -> int:
    """Parse arguments, run `body`, turn known failures into one line on stderr and exit 2.

    `logging_setup` replaces the package's logging (`logs.setup_logging`) for a command whose
    log lines keep another tool's format (danube-preprocess writes Megatron-LM's)."""
    from megatron_danube.logs import setup_logging

    (logging_setup or setup_logging)()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(body(args) or 0)
    except DanubeRankError as exc:
        return fail(prog, str(exc), this_rank_only=True, exit_code=exc.exit_code)
    except DanubeConfigError as exc:
        return fail(prog, str(exc))
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        return fail(prog, message)


def run_as_process(main: Callable[[], Optional[int]]) -> NoReturn:
    """A command's `__main__`: run `main` and end the process with its exit code (or its
    `sys.exit`'s), through `exit_now`. An uncaught exception takes Python's usual way out, with
    its traceback."""
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")  # what sys.exit("message") prints, with exit code 1
        code = 1
    exit_now(code or 0)


def exit_now(code: int) -> NoReturn:
    """End the process once its work is done and closed: log handlers and stdio flushed, the
    atexit functions run (multiprocessing stops its helper processes there), then `os._exit`.

    What is skipped is the interpreter's teardown of every loaded module: after megatron-core's
    imports (torch._dynamo, inductor, sympy) it takes over a second per process and writes
    nothing. Where a non-daemon thread is still running, the process waits for it as usual."""
    import atexit
    import os
    import threading

    main_thread = threading.main_thread()
    if any(t is not main_thread and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # logging.shutdown is one of them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to deliver
            pass
    os._exit(code)


def cpu_only_process() -> None:
    """Hide the GPUs from this process: the tools that read and write whole checkpoints
    (convert, compare) run on the CPU, on a GPU node too. Called first thing in their entry
    points, before anything asks CUDA for its devices (torch caches the first answer); a GPU
    seen later next to megatron's CPU patches is refused in one line by `cpu_compat`."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def weights_only_loads() -> None:
    """Every `torch.load` megatron does on our checkpoints is weights-only: no pickled code
    in a checkpoint runs. Called first thing by the commands that read checkpoints (torch
    reads the variable at each load); a value the user set is kept."""
    import os

    os.environ.setdefault("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")


def fail(prog: str, message: str, this_rank_only: bool = False, exit_code: int = 2) -> int:
    """Exit code 2 and the one-line error, printed once: by rank 0 of a launched job (every
    rank reaches the same verdict on a config; the others stay quiet), or, for a problem only
    this rank met (`this_rank_only`), by this rank. The exit code is 2 unless given."""
    logging.getLogger(prog).debug("failing: %s", message)
    if this_rank_only or launched_rank() == 0:
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()
    else:
        import time

        # Rank 0 prints the line; the launcher tears the job down when the first rank exits.
        time.sleep(QUIET_RANK_EXIT_DELAY_S)
    return exit_code


QUIET_RANK_EXIT_DELAY_S = 3.0


def launched_rank() -> int:
    """This process's rank under torchrun or srun; 0 when run alone."""
    import os

    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def summary(doc: str) -> str:
    """A command's description for --help: the first paragraph of its module docstring."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def report(text: str = "") -> None:
    """A command's result (a table, a summary) goes to stdout; diagnostics go to logging."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
