"""Logging for every entry point: progress from rank 0 only, warnings from every rank.

Progress goes to stdout (it is the run's log); each record carries the time and, where there
are several ranks, the rank that wrote it. Warnings are filtered by message and module, never
wholesale: the ones silenced here are known, harmless and repeated by every process.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# (message regex, module regex) of warnings that say nothing actionable about this package.
KNOWN_WARNINGS = (
    # megatron-core on a machine without TE/apex: its fallbacks are what the CPU path uses.
    (r".*Transformer Engine and Apex are not installed.*", r"megatron\..*"),
    (r".*Apex is not installed.*", r"megatron\..*"),
    # torch's weights-only unpickling note, printed for every megatron checkpoint load.
    (r".*torch.load.*weights_only.*", r""),
    # megatron's optimizer probes `.grad` on main params while building its groups.
    (r".*\.grad attribute of a Tensor that is not a leaf.*", r"megatron\.core\.optimizer.*"),
    # megatron's TransformerConfig defaults trip its own deprecation note on every build.
    (r".*full scope is deprecated.*", r"megatron\.core\.transformer.*"),
    # megatron 0.16 reads checkpoints through torch's old (still working) entry point.
    (r".*`load_state_dict` is deprecated.*", r"megatron\.core\.dist_checkpointing.*"),
    # megatron 0.16 calls the collectives torch renamed; the old names still work.
    (
        r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*deprecated.*",
        r"torch\.distributed\..*",
    ),
)


def process_rank() -> int:
    """This process's rank from torch.distributed, else from the launcher's variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class RankFilter(logging.Filter):
    """INFO and below from rank 0 only; every record labelled with its rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        record.rank = rank
        return rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once per process (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(f, RankFilter) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(RankFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(level)
    # megatron-core's INFO lines (its DDP and optimizer settings dumps) drown the run's log.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    logging.captureWarnings(True)
