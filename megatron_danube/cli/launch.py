"""danube-launch: torchrun, but a stop signal means "save and exit 0", as it does under srun.

    danube-launch --nproc-per-node 8 -m megatron_danube.pretrain --config FILE.yaml

Takes torchrun's arguments unchanged. torchrun answers SIGTERM (and Ctrl-C) by raising in the
launcher, tearing the workers down and exiting 1; SIGUSR1 kills it outright. Here SIGTERM,
SIGINT and SIGUSR1 are passed on to the workers, which save at the next step boundary and
exit 0, so the launcher exits 0 too. A second SIGINT or SIGTERM falls back to torchrun's own
handling (tear down now).
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

    from megatron_danube.logs import setup_logging

    setup_logging()
    handled = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    names = [n.strip() for n in handled.split(",") if n.strip()]
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(dict.fromkeys(names + ["SIGUSR1"]))
    # torchrun installs this module-level handler when it starts the workers.
    original = api._terminate_process_handler
    api._terminate_process_handler = _forwarding_handler(original)
    sys.exit(torchrun.main(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
