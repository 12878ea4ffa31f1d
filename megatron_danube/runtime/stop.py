"""Stop signals, honoured from process start: SIGTERM/SIGUSR1 mean "save at the next step
boundary and exit 0". This module imports nothing heavy, so the entry points install the
handler before torch and megatron-core load (seconds, in which a signal would otherwise kill
the process)."""

from __future__ import annotations

import signal
from typing import Optional


class StopRequest:
    """Set by SIGTERM/SIGUSR1 at any time; acted on by all ranks together at a step boundary."""

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def ranks_signalled(self, device) -> int:
        """How many ranks have received a stop signal (0: none); the same answer on every
        rank, so all stop together even where the signal reached only some (across nodes,
        the launcher may deliver it to one node before the other)."""
        import torch
        import torch.distributed as dist

        count = torch.tensor([1.0 if self.signal else 0.0], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        return int(count.item())
