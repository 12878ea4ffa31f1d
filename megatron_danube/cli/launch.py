"""danube-launch: torchrun, but a stop signal means "save and exit 0", as it does under srun,
and a bad config is one line and exit 2.

    danube-launch --nproc-per-node 8 -m megatron_danube.pretrain --config FILE.yaml

Takes torchrun's arguments unchanged. It differs from torchrun in two ways:

* Stop signals: torchrun answers SIGTERM (and Ctrl-C) by raising in the launcher, tearing the
  workers down and exiting 1; SIGUSR1 kills it outright. Here SIGTERM, SIGINT and SIGUSR1 are
  passed on to the workers, which save at the next step boundary and exit 0, so the launcher
  exits 0 too. A second SIGINT or SIGTERM tears the workers down now (torchrun's handling) and
  exits 128 + the signal's number, without a traceback.
* Bad input: when the workers stopped on a one-line error (some exited 2, rank 0 printed the
  line, the rest exited 2 too or were torn down), the launcher exits 2 without torchrun's
  failure report and traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

logger = logging.getLogger("danube-launch")
FORWARDED = ("SIGTERM", "SIGINT", "SIGUSR1")


def _forwarding_handler(original):
    received = set()

    def handler(signum, frame):
        import psutil

        if signum in received and signum != signal.SIGUSR1:
            return original(signum, frame)  # asked twice: stop now, torchrun's way
        received.add(signum)
        workers = psutil.Process().children(recursive=False)
        logger.warning(
            "%s: passing it to %d workers; they save and exit (send it again to stop now)",
            signal.Signals(signum).name,
            len(workers),
        )
        for worker in workers:
            try:
                worker.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)
            except psutil.NoSuchProcess:
                pass

    return handler


def main(argv=None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from megatron_danube.logs import setup_logging

    setup_logging()
    handled = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    names = [n.strip() for n in handled.split(",") if n.strip()]
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(dict.fromkeys(names + ["SIGUSR1"]))
    # torchrun installs this module-level handler when it starts the workers.
    original = api._terminate_process_handler
    api._terminate_process_handler = _forwarding_handler(original)
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        if stopped_on_bad_input(exc.failures.values()):
            sys.exit(BAD_INPUT_EXIT)  # the workers' one-line error says it all
        raise
    except api.SignalException as exc:  # a stop signal sent twice: torn down, as asked
        logger.warning("%s received twice: the workers were stopped now", exc.sigval.name)
        sys.exit(128 + int(exc.sigval))  # the shell's convention for "ended by a signal"
    sys.exit(0)


BAD_INPUT_EXIT = 2  # what every command of this package exits with on a one-line error


def stopped_on_bad_input(failures) -> bool:
    """Some worker exited 2 and the rest either did too or were torn down by the launcher."""
    codes = {failure.exitcode for failure in failures}
    return BAD_INPUT_EXIT in codes and codes <= {BAD_INPUT_EXIT, -signal.SIGTERM, -signal.SIGKILL}


def parser():
    """torchrun's own argument parser under this command's name and description."""
    from torch.distributed import run as torchrun

    from megatron_danube.cli.common import summary

    p = torchrun.get_args_parser()
    p.prog = "danube-launch"
    p.description = summary(__doc__) + (
        " Takes torchrun's arguments, listed below; see `pydoc megatron_danube.cli.launch`."
    )
    return p


if __name__ == "__main__":
    main()
